"""HTTP front ends: the Open Inference Protocol's REST form (``oip_rest``)."""
