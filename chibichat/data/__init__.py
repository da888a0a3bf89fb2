"""chibichat.data"""
