"""Generated gRPC stubs for the ``lossd.v1`` API. Do not edit: run ``make proto``."""
