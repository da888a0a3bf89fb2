"""chibichat: the whole small-LLM lifecycle in one package.

Importing this package has no side effects: nothing touches the disk, the network or a GPU
until a stage's run() is called.
"""

__version__ = "0.1.0"
