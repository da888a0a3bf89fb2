"""chibichat.train"""
