/* CALLBACKOP_register and _unregister as Xen answers a 64-bit PV guest
 * (xen/arch/x86/pv/callback.c): every type registers, syscall32 and
 * sysenter included (a guest registering all of them at start-up must not
 * stop there); a non-canonical NMI callback is -EINVAL; only the NMI
 * callback unregisters (-EINVAL for the other known types, -ENOSYS for
 * unknown ones); the event callback still works after all this. */
#include "tg_events.h"

const char tg_name[] = "callbacks";

struct callback_unregister { u16 type, _pad; };

static long reg(u16 type, u16 flags, u64 address)
{
	struct callback_register cb = { type, flags, 0, address };
	return HC2(HC_callback_op, CALLBACKOP_register, &cb);
}

static long unreg(u16 type)
{
	struct callback_unregister cb = { type, 0 };
	return HC2(HC_callback_op, CALLBACKOP_unregister, &cb);
}

static void noop_entry(void) { }

void tg_main(struct start_info *s)
{
	u64 fn = (u64)noop_entry;
	static const u16 types[] = { CALLBACKTYPE_failsafe, CALLBACKTYPE_syscall, CALLBACKTYPE_syscall32,
				     CALLBACKTYPE_sysenter, CALLBACKTYPE_nmi };
	for (unsigned i = 0; i < sizeof(types) / sizeof(types[0]); i++) {
		tg_check(reg(types[i], 0, fn) == 0, "register", types[i], 0);
		tg_check(reg(types[i], CALLBACKF_mask_events, fn) == 0, "register masking events", types[i], 0);
	}
	long rc = reg(CALLBACKTYPE_nmi, 0, 0x8000000000000000UL);
	tg_check(rc == -XEN_EINVAL, "non-canonical NMI callback", rc, -XEN_EINVAL);
	rc = reg(6, 0, fn);
	tg_check(rc == -XEN_ENOSYS, "register type 6 (none)", rc, -XEN_ENOSYS);

	static const u16 fixed[] = { CALLBACKTYPE_event, CALLBACKTYPE_failsafe, CALLBACKTYPE_syscall,
				     CALLBACKTYPE_syscall32, CALLBACKTYPE_sysenter };
	for (unsigned i = 0; i < sizeof(fixed) / sizeof(fixed[0]); i++) {
		rc = unreg(fixed[i]);
		tg_check(rc == -XEN_EINVAL, "unregister refused", fixed[i], rc);
	}
	rc = unreg(CALLBACKTYPE_nmi);
	tg_check(rc == 0, "unregister the NMI callback", rc, 0);
	rc = unreg(9);
	tg_check(rc == -XEN_ENOSYS, "unregister type 9", rc, -XEN_ENOSYS);
	rc = HC2(HC_callback_op, 2, 0);
	tg_check(rc == -XEN_ENOSYS, "callback_op 2", rc, -XEN_ENOSYS);

	/* the event callback, registered by ev_setup after all of the above,
	 * still delivers an upcall */
	ev_setup(s);
	struct evtchn_bind_ipi ipi = { 0, 0 };
	rc = evtchn_op(EVTCHNOP_bind_ipi, &ipi);
	tg_check(rc == 0, "bind_ipi", rc, 0);
	ev_enable();
	ev_send(ipi.port);
	tg_check(ev_hits[ipi.port] == 1, "upcall after the callback calls", ev_hits[ipi.port], 1);
}
