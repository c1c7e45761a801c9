"""Model definitions shared by the exporters, which write torch entries, and the server's
PyTorch runtime, which rebuilds them: neither imports the other for them. Importing this
package imports nothing; its modules import torch, except ``entry_format``."""
