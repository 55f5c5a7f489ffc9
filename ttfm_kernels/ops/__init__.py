"""Ops: each folder holds one op family's reference formula, fast backends, dispatcher and autograd."""
