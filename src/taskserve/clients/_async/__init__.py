"""The asyncio client, written by hand: the one source of both clients.

``taskserve.clients._sync`` (the blocking client) is generated from these modules by
``python -m taskserve.clients.codegen`` (``make clients``); edit here, then regenerate.
"""
