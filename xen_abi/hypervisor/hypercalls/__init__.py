"""The Python side of the hypercall ABI: dispatch.py (the entry point and a
domain's hypercall state), context.py (what handlers share), table.py (who
handles each hypercall: shim, Python or both), one module per hypercall
family the shim passes on."""
