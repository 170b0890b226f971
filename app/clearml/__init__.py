"""Where a deployment reports and how it is launched from ClearML: the task (`task.py`, the only module that imports
`clearml`), the dashboard's names, the app definition and the task template (docs/clearml.md)."""
