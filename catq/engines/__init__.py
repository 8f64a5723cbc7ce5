"""Engines: clients for SGLang-compatible servers, catq's own engine server, and model loading.

Submodules are imported where used, so a client-only process never imports torch.
"""
