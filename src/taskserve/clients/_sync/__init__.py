"""The blocking client, generated from ``taskserve.clients._async`` by tools/generate_sync_client.py.

Do not edit: change the asyncio source and run ``make clients``.
"""
