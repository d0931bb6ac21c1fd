"""xenstore, in four rooms: the tree (store.py), the wire protocol
(protocol.py), the shared-ring transport (ring.py) and what a toolstack
writes for a guest (toolstack.py)."""
