"""chibichat.tasks: training conversations and evaluation items (see base.py for the item schema).

The parts, by file:
    definitions   base.py (Task, views, Mixture, GeneratedTask), items.py (item formats the evaluation
                  sets share), arithmetic.py, spelling.py, identity.py (generated), skills.py (held-out
                  skill prompts and checkers), preferences.py (DPO pairs), local.py (the user's own files)
    data          shipped.py (the data shipped in assets/ and the tasks that are only that),
                  evalsets.py (chat evaluation sets, shipped or online), online.py, jglue.py, dclm.py
    fetchers      hub.py (Hugging Face parquet cache); jglue.fetch_jglue, dclm.fetch_bundle
    registry      registry.py (every name -> its builder and options), leakage.py (eval data never trains)
"""

from chibichat.tasks.base import CoreTask, ListTask, Mixture, Task, TaskView
from chibichat.tasks.registry import get_task, list_tasks

__all__ = ["Task", "TaskView", "ListTask", "CoreTask", "Mixture", "get_task", "list_tasks"]
