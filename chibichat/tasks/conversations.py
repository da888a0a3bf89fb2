"""Shipped conversation data (kind "conversation", training only).

chitchat       human small-talk chats (chitchat-dataset, MIT), cut into windows of up to 4 exchanges
chatterbot     chatterbot-corpus English conversations (BSD-3), one item per conversation
chatterbot-ja  chatterbot-corpus Japanese conversations (BSD-3)

Items are `{"messages": [...]}` plus provenance fields ("source_id"/"window" or "category").
"""

from __future__ import annotations

from chibichat.tasks.base import ListTask
from chibichat.tasks.shipped import read_shipped

SHIPPED_CONVERSATIONS = {
    "chitchat": ("en", "human small-talk chats (chitchat-dataset, MIT)"),
    "chatterbot": ("en", "chatterbot-corpus English conversations (BSD-3)"),
    "chatterbot-ja": ("ja", "chatterbot-corpus Japanese conversations (BSD-3)"),
}


def shipped_conversations(name: str) -> ListTask:
    lang, description = SHIPPED_CONVERSATIONS[name]
    items = read_shipped(name)
    return ListTask(name, "conversation", items, lang=lang, description=description)
