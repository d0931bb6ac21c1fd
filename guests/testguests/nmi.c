/* Virtual NMIs of a 64-bit PV guest as Xen 4.17 delivers them (arch/x86
 * domain.c VCPUOP_send_nmi, pv/callback.c register_guest_nmi_callback,
 * x86_64/entry.S process_nmi, pv/iret.c async_exception_cleanup).  Built
 * for 2 vCPUs ("nr_vcpus=2" on the command line):
 *  - no NMI callback: send_nmi to itself returns 0 and the NMI is dropped
 *    (not delivered once a callback is registered later);
 *  - send_nmi with an argument -EINVAL, an id the domain does not have
 *    -ENOENT, neither delivers anything;
 *  - CALLBACKTYPE_nmi registered, a send to itself is delivered at once
 *    (right after the syscall): Xen's bounce frame (rcx r11 rip cs|mask<<32
 *    rflags rsp ss, kernel CS with RPL 0, the saved upcall mask and IF),
 *    events masked in the handler, restored by HYPERVISOR_iret; the same
 *    with events masked at the send;
 *  - a send from inside the handler is held (NMIs masked) until
 *    HYPERVISOR_iret, then delivered exactly once;
 *  - a non-canonical callback -EINVAL, the old one kept; unregistered:
 *    dropped again;
 *  - an NMI sent to vCPU 1 before it is up is taken when it starts (its
 *    handler from VCPUOP_initialise's trap_ctxt[2]);
 *  - vCPU 1 blocked
 *    in SCHEDOP_block, then in SCHEDOP_poll: an NMI from vCPU 0 wakes it and
 *    its handler runs right after the hypercall;
 *  - hostile: a flood of sends to vCPU 1 (each answered 0, vCPU 1 keeps
 *    running, takes at most one NMI per send); vCPU 1's handler never
 *    irets: further NMIs are held, vCPU 1 and vCPU 0 keep running. */
#include "tg_events.h"
#include "mmutest.h"
#include "vcpu_ctx.h"
#include "tg_smp.h"

const char tg_name[] = "nmi";

#define STACK_SIZE 16384
#define FLAT_KERNEL_CS FLAT_RING3_CS64
#define FLAT_KERNEL_SS FLAT_RING3_SS64
#define NONCANON 0x0000800000000000UL
#define WAIT_MS 10000
#define FLOOD 300

struct sched_poll { u64 ports; u32 nr_ports, _p; u64 timeout; };

static u8 sec_stack[STACK_SIZE] __attribute__((aligned(4096)));
static struct vcpu_guest_context ctx;
static struct start_info *start;

/* per vCPU: NMIs taken, the last frame, the upcall mask seen inside */
static volatile u64 hits[2], frame[2][7], mask_inside[2];
/* what the handler does (vCPU 0's tests) */
enum { H_PLAIN, H_NESTED, H_STUCK };
static volatile int handler_mode[2];
static volatile long nested_rc = -1;
static volatile u64 nested_hits_after_yield;
/* vCPU 1's commands */
enum { C_IDLE, C_BLOCK, C_POLL, C_SPIN, C_STUCK };
static volatile int cmd1 = C_IDLE;
static volatile u64 alive1, in_call1, returned1, heartbeat1;
static volatile long rc1;

static long vop(u64 cmd, u64 vcpu, u64 arg) { return HC3(HC_vcpu_op, cmd, vcpu, arg); }
static long send_nmi(u64 vcpu) { return vop(VCPUOP_send_nmi, vcpu, 0); }
#define CK(what, got, want) do { s64 _g = (s64)(got), _w = (s64)(want); tg_check(_g == _w, what, _g, _w); } while (0)

static inline int this_cpu(void)
{
	u64 sp;
	__asm__ volatile("mov %%rsp, %0" : "=r"(sp));
	return sp > (u64)sec_stack && sp <= (u64)sec_stack + STACK_SIZE;
}
static volatile struct vcpu_info *vinfo(int c) { return (volatile struct vcpu_info *)&si->vcpu_info[c]; }

/* The NMI entry: Xen's frame rcx, r11, rip, cs, rflags, rsp, ss (no error
 * code); back with HYPERVISOR_iret as Linux's xen_iret.  The sends whose
 * return address the frames are checked against are labelled. */
__asm__(
	".text\n"
	"nmi_entry:\n"
	"	pushq %rax; pushq %rdi; pushq %rsi; pushq %rdx; pushq %r8; pushq %r9; pushq %r10\n"
	"	leaq 56(%rsp), %rdi\n"
	"	call nmi_handler\n"
	"	popq %r10; popq %r9; popq %r8; popq %rdx; popq %rsi; popq %rdi; popq %rax\n"
	"	popq %rcx\n"
	"	popq %r11\n"
	"	jmp tg_ev_xen_iret\n"
	"nmi_failsafe_entry:\n"
	"	movq %rsp, %rdi\n"
	"	andq $-16, %rsp\n"
	"	call nmi_failsafe\n"
	"	ud2\n"
	/* vCPU 1 starts here, rsp = the top of its stack */
	"nmi_secondary_entry:\n"
	"	call nmi_secondary_main\n"
	"	ud2\n");
extern char nmi_entry[], nmi_failsafe_entry[], nmi_secondary_entry[];

/* a hypercall by `syscall` whose return address is the label `name`
 * (one copy of each: noinline) */
#define LABELLED_HC(fn, name, NR)                                                       \
static __attribute__((noinline)) long fn(long a1, long a2, long a3)                    \
{                                                                                       \
	register long r10 __asm__("r10") = 0;                                           \
	register long r8 __asm__("r8") = 0;                                             \
	long ret;                                                                       \
	__asm__ volatile("syscall\n.globl " #name "\n" #name ":"                        \
			 : "=a"(ret), "+D"(a1), "+S"(a2), "+d"(a3), "+r"(r10), "+r"(r8)   \
			 : "0"((long)(NR)) : "rcx", "r11", "r9", "memory");              \
	return ret;                                                                     \
}
extern char after_self_send[], after_block[], after_poll[];
LABELLED_HC(vop_labelled, after_self_send, HC_vcpu_op)
LABELLED_HC(block_hc, after_block, HC_sched_op)
LABELLED_HC(poll_hc, after_poll, HC_sched_op)
static long send_self_labelled(void) { return vop_labelled(VCPUOP_send_nmi, 0, 0); }
static long block_labelled(void) { return block_hc(SCHEDOP_block, 0, 0); }
static long poll_labelled(struct sched_poll *p) { return poll_hc(SCHEDOP_poll, (long)p, 0); }

void nmi_failsafe(u64 *f);
void nmi_failsafe(u64 *f)
{
	tg_check(0, "failsafe callback (rip)", f[6], 0);
	tg_finish();
}

void nmi_handler(u64 *f);
void nmi_handler(u64 *f)
{
	int c = this_cpu();
	mask_inside[c] = vinfo(c)->upcall_mask;
	for (int i = 0; i < 7; i++)
		frame[c][i] = f[i];
	hits[c]++;
	if (handler_mode[c] == H_NESTED) {
		handler_mode[c] = H_PLAIN;
		nested_rc = send_nmi(c);    /* held until our HYPERVISOR_iret */
		yield();
		yield();
		nested_hits_after_yield = hits[c];
	} else if (handler_mode[c] == H_STUCK) {
		/* never irets: NMIs stay masked; the vCPU keeps running */
		for (;;) {
			heartbeat1++;
			yield();
		}
	}
}

static long nmi_callback(u64 address)
{
	struct callback_register cb = { CALLBACKTYPE_nmi, 0, 0, address };
	return HC2(HC_callback_op, CALLBACKOP_register, &cb);
}
static long nmi_unregister(void)
{
	u16 cb[2] = { CALLBACKTYPE_nmi, 0 };
	return HC2(HC_callback_op, CALLBACKOP_unregister, cb);
}

/* ---- vCPU 1 ---- */
void nmi_secondary_main(void);
void nmi_secondary_main(void)
{
	vinfo(1)->upcall_mask = 1;
	alive1 = 1;
	for (;;) {
		int c = cmd1;
		if (c == C_BLOCK || c == C_POLL) {
			u64 before = hits[1];
			u32 port = 1;    /* unbound, never pending */
			struct sched_poll p = { (u64)&port, 1, 0, 0 };
			in_call1 = 1;
			/* a spurious return blocks again; only the NMI ends it */
			do
				rc1 = c == C_BLOCK ? block_labelled() : poll_labelled(&p);
			while (hits[1] == before);
			vinfo(1)->upcall_mask = 1;
			in_call1 = 0;
			returned1++;
			cmd1 = C_IDLE;
		} else if (c == C_STUCK) {
			handler_mode[1] = H_STUCK;
			cmd1 = C_SPIN;
		}
		heartbeat1++;
		cpu_relax();
	}
}

static u64 l4_maddr(void) { return ((u64 *)start->mfn_list)[va_to_pfn((void *)start->pt_base)] << 12; }

static int bring_up_vcpu1(void)
{
	tg_kernel_context(&ctx, (u64)nmi_secondary_entry, (u64)sec_stack + STACK_SIZE, l4_maddr());
	/* the NMI handler through the trap table, as Linux sets it (an
	 * interrupt gate: events masked) */
	ctx.trap_ctxt[2] = (struct trap_info){ 2, 4, FLAT_KERNEL_CS, 0, (u64)nmi_entry };
	ctx.event_callback_eip = (u64)tg_upcall_entry;
	ctx.failsafe_callback_eip = (u64)nmi_failsafe_entry;
	long rc = vop(VCPUOP_initialise, 1, (u64)&ctx);
	CK("VCPUOP_initialise(1)", rc, 0);
	rc = vop(VCPUOP_up, 1, 0);
	CK("VCPUOP_up(1)", rc, 0);
	int ok = WAIT_UNTIL(alive1, WAIT_MS);
	CK("vCPU 1 runs", ok, 1);
	return ok;
}

/* the frame of vCPU c's last NMI, taken in kernel mode at `rip` with the
 * upcall mask `mask` */
static void check_frame(int c, const char *what, u64 rip, u64 mask)
{
	tg_puts("nmi: frame checks: "); tg_puts(what); tg_puts("\n");
	volatile u64 *f = frame[c];
	CK("frame rip: right after the syscall", f[2], rip);
	CK("frame rcx: the guest's (syscall's return address)", f[0], rip);
	CK("frame cs: kernel CS with RPL 0", f[3] & 0xffff, FLAT_KERNEL_CS & ~3);
	CK("frame cs bits 32+: the saved upcall mask", f[3] >> 32, mask);
	CK("frame rflags.IF: !upcall mask", (f[4] >> 9) & 1, !mask);
	CK("frame ss", f[6], FLAT_KERNEL_SS);
	CK("events masked in the handler", mask_inside[c], 1);
	if (c == 0)
		CK("upcall mask restored by HYPERVISOR_iret", vinfo(c)->upcall_mask, mask);
}

void tg_main(struct start_info *s)
{
	start = s;
	ev_setup(s);            /* shared_info mapped, an event callback */
	tg_calibrate_tsc();
	vi->upcall_mask = 0;

	/* no callback: dropped */
	CK("send_nmi to itself without a callback", send_nmi(0), 0);
	yield();
	CK("no callback: nothing delivered", hits[0], 0);

	/* bad arguments */
	u64 x = 0;
	CK("send_nmi with an argument: -EINVAL", vop(VCPUOP_send_nmi, 0, (u64)&x), -XEN_EINVAL);
	CK("send_nmi to vCPU 2 of 2: -ENOENT", send_nmi(2), -XEN_ENOENT);
	CK("send_nmi to vCPU 4095: -ENOENT", send_nmi(4095), -XEN_ENOENT);

	/* registered; the NMI dropped above stays dropped */
	CK("register the NMI callback", nmi_callback((u64)nmi_entry), 0);
	yield();
	yield();
	CK("the dropped NMI is not delivered later", hits[0], 0);
	CK("-EINVAL above sent nothing", hits[0], 0);

	/* to itself: at once */
	CK("send_nmi to itself", send_self_labelled(), 0);
	CK("delivered at once", hits[0], 1);
	check_frame(0, "events enabled", (u64)after_self_send, 0);
	yield();
	CK("delivered once", hits[0], 1);

	vi->upcall_mask = 1;
	CK("send_nmi to itself, events masked", send_self_labelled(), 0);
	CK("delivered at once (events masked)", hits[0], 2);
	check_frame(0, "events masked", (u64)after_self_send, 1);
	vi->upcall_mask = 0;

	/* a send inside the handler: held until HYPERVISOR_iret, then once */
	handler_mode[0] = H_NESTED;
	CK("send_nmi to itself (nested test)", send_self_labelled(), 0);
	CK("the send inside the handler: 0", nested_rc, 0);
	CK("inside the handler: the second NMI held", nested_hits_after_yield, 3);
	CK("after HYPERVISOR_iret: the held NMI delivered", hits[0], 4);
	CK("the held NMI: its frame is the first one's return", frame[0][2], (u64)after_self_send);
	yield();
	yield();
	CK("the held NMI delivered exactly once", hits[0], 4);

	/* a non-canonical callback refused, the old one kept */
	CK("non-canonical NMI callback: -EINVAL", nmi_callback(NONCANON), -XEN_EINVAL);
	CK("send_nmi after the refused callback", send_nmi(0), 0);
	CK("the old callback still takes it", hits[0], 5);

	/* unregistered: dropped again */
	CK("unregister the NMI callback", nmi_unregister(), 0);
	CK("send_nmi, unregistered", send_nmi(0), 0);
	yield();
	CK("unregistered: nothing delivered", hits[0], 5);
	CK("register the NMI callback again", nmi_callback((u64)nmi_entry), 0);
	yield();
	CK("the dropped NMI stays dropped", hits[0], 5);

	/* vCPU 1: an NMI sent before it is up waits for its first entry */
	CK("send_nmi to vCPU 1, not up yet", send_nmi(1), 0);
	if (!bring_up_vcpu1())
		return;
	int ok = WAIT_UNTIL(hits[1] == 1, WAIT_MS);
	CK("vCPU 1 took the NMI sent before it was up (trap_ctxt[2])", ok, 1);
	CK("vCPU 1's NMI while it runs", send_nmi(1), 0);
	ok = WAIT_UNTIL(hits[1] == 2, WAIT_MS);
	CK("vCPU 1 running: its handler ran again", ok, 1);

	/* block unmasks events (Xen's do_block), poll leaves them masked */
	static const struct { int cmd; const char *what; char *label; u64 mask; } waits[] = {
		{ C_BLOCK, "SCHEDOP_block", after_block, 0 }, { C_POLL, "SCHEDOP_poll", after_poll, 1 } };
	for (int i = 0; i < 2; i++) {
		u64 before = hits[1], ret = returned1;
		cmd1 = waits[i].cmd;
		ok = WAIT_UNTIL(in_call1, WAIT_MS);
		delay_ms(20);      /* vCPU 1 halted in the shim by now */
		CK("vCPU 1 still waiting (nothing else wakes it)", hits[1], before);
		CK("send_nmi to the waiting vCPU 1", send_nmi(1), 0);
		ok = WAIT_UNTIL(returned1 != ret, WAIT_MS);
		tg_puts("nmi: vCPU 1 in "); tg_puts(waits[i].what); tg_puts("\n");
		CK("the NMI woke vCPU 1", ok, 1);
		CK("its handler ran once", hits[1], before + 1);
		CK("the hypercall returned 0", rc1, 0);
		if (ok)
			check_frame(1, waits[i].what, (u64)waits[i].label, waits[i].mask);
	}

	/* a flood */
	cmd1 = C_SPIN;
	u64 before = hits[1], bad = 0;
	for (int i = 0; i < FLOOD; i++)
		bad += send_nmi(1) != 0;
	CK("flood: every send_nmi answered 0", bad, 0);
	ok = WAIT_UNTIL(hits[1] > before, WAIT_MS);
	CK("flood: vCPU 1 took NMIs", ok, 1);
	u64 hb = heartbeat1;
	ok = WAIT_UNTIL(heartbeat1 != hb, WAIT_MS);
	CK("flood: vCPU 1 still runs", ok, 1);
	tg_check(hits[1] - before <= FLOOD, "flood: at most one NMI per send", hits[1] - before, FLOOD);

	/* a handler that never irets */
	cmd1 = C_STUCK;
	ok = WAIT_UNTIL(cmd1 == C_SPIN, WAIT_MS);
	before = hits[1];
	CK("send_nmi into the handler that never irets", send_nmi(1), 0);
	ok = WAIT_UNTIL(hits[1] == before + 1, WAIT_MS);
	CK("vCPU 1 entered the handler", ok, 1);
	for (int i = 0; i < FLOOD; i++)
		bad += send_nmi(1) != 0;
	CK("more sends to the stuck handler answered 0", bad, 0);
	hb = heartbeat1;
	ok = WAIT_UNTIL(heartbeat1 > hb + 2, WAIT_MS);
	CK("vCPU 1 keeps running in its handler", ok, 1);
	delay_ms(10);
	CK("NMIs held while the handler has not returned", hits[1], before + 1);
	CK("vCPU 0 still takes its own NMIs", send_self_labelled(), 0);
	CK("vCPU 0's NMI delivered", hits[0], 6);
}
