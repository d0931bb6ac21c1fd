/* The vectors shimfuzz takes besides traps_entry.S's 3, 6, 13 and 14:
 * the faults a generated instruction, segment load or iret frame can raise. */
	.section .note.GNU-stack, "", @progbits
	.text
#include "tg_trap.h"
	TRAP 0, 0
	TRAP 1, 0
	TRAP 4, 0
	TRAP 5, 0
	TRAP 10, 1
	TRAP 11, 1
	TRAP 12, 1
	TRAP 7, 0
	TRAP 16, 0
	TRAP 17, 1
	TRAP 19, 0
