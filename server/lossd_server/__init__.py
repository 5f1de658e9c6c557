"""lossd server: evaluates Keras losses and trains image models over gRPC.

The core (``losses``, ``evaluator``, ``tensors``, ``training``) imports no
gRPC; the transport (``app``, ``servicers``) adapts it to the wire.
"""

__version__ = "0.1.0"
