"""Data: conversations -> chat-template tokens with an assistant-only loss mask -> draft vocab."""
