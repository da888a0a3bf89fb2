"""chibichat.eval"""
