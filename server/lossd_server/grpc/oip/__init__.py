"""Generated gRPC stubs for the Open Inference Protocol's ``inference`` service. Do not
edit: run ``make proto``."""
