"""chibichat.serve"""
