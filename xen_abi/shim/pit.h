/* The PIT's channel 2 and port 0x61 (pit.c), the one device a PV domU
 * reaches by port I/O: Xen emulates it for every PV guest.  entry.S's
 * port-I/O fast path leaves these ports to the C path. */
#ifndef SHIM_PIT_H
#define SHIM_PIT_H

#define PIT_CH2_PORT   0x42
#define PIT_MODE_PORT  0x43
#define PIT_GATE_PORT  0x61

#ifndef __ASSEMBLER__
#include <stdint.h>
int pit_port(uint16_t port);               /* 1 for the three ports above */
uint8_t pit_read(uint16_t port);
void pit_write(uint16_t port, uint8_t value);
#endif
#endif
