"""chibichat.tasks: training conversations and evaluation items (see base.py for the item schema)."""

from chibichat.tasks.base import CoreTask, ListTask, Mixture, Task, TaskView
from chibichat.tasks.registry import get_task, list_tasks

__all__ = ["Task", "TaskView", "ListTask", "CoreTask", "Mixture", "get_task", "list_tasks"]
