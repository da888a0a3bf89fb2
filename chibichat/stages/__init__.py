"""chibichat.stages"""
