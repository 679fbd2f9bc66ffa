"""DVC stages: one module per stage in ``dvc.yaml``, named like the stage.

Each reads its ``params.yaml`` sections, calls the library in ``pipeline``,
writes its outputs atomically and logs to MLflow. ``_cli`` holds the
command-line wiring they share.
"""
