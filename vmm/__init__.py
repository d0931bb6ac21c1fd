"""pyvmm.vmm: KVM from Python (knows nothing about Xen).

kvm      typed handles Kvm / Vm / Vcpu, ioctl numbers and structures
memory   GuestMemory: memfd-backed guest RAM with checked accessors
handles  FdHandle, unmap: closing and unmapping, shared by the handles above
x86      architectural constants, descriptor/gate/TSS builders
quirks   detect_quirks(): how the host's KVM deviates (kvm_pvm), probes
flatvm   tiny long-mode machines for flat test binaries (vmm/flat/*.S)
"""
