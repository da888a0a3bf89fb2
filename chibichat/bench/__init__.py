"""chibichat.bench"""
