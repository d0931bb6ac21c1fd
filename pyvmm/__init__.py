"""pyvmm: run stock Xen PV guests on KVM, from Python."""
__version__ = "0.1.0"
