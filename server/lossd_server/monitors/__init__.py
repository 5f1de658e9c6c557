"""Loss monitors: a deployed model's loss, live, from predictions observed by
id and labels that arrive later (``service.MonitorService``; its state in
``state``, its statistics in ``stats``). docs/monitors.md describes them."""
