"""chibichat.model"""
