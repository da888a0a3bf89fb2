"""chibichat.tasks"""
