"""Which task a module serves and which it trained: the task bookkeeping every task-aware module
mixes in (``tracked``), the per-sample task selection (``selection``), and the flag that a
first-call trace is recording (``recording``)."""
