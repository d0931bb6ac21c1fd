/* vcpu_op with one vCPU, as Xen 4.17 answers a 64-bit PV domU
 * (common/domain.c do_vcpu_op / common_vcpu_op, arch/x86/domain.c):
 *   - a vCPU id the domain does not have is -ENOENT; the id is an unsigned
 *     int and the sub-op an int (the upper halves of their registers are
 *     ignored); an unknown sub-op is -ENOSYS;
 *   - is_up, get_runstate_info (-EFAULT for a bad buffer);
 *   - register_runstate_memory_area and register_vcpu_time_memory_area:
 *     -EFAULT for an unreadable argument or an address outside the
 *     guest's half (non-canonical, the hypervisor's range); an unmapped
 *     lower-half address is accepted and simply not written; the area is
 *     filled at once (the time area: a copy of vcpu_info's time record,
 *     even version); 0 unregisters;
 *   - send_nmi with an argument and get_physid (dom0's pinned vCPUs only)
 *     are -EINVAL. */
#include "tg.h"
const char tg_name[] = "vcpuop";

struct time_info { u32 version, pad0; u64 tsc_timestamp, system_time; u32 mul; int8_t shift; u8 flags, pad[2]; };
_Static_assert(sizeof(struct time_info) == 32, "time_info");

static u8 si_page[4096] __attribute__((aligned(4096)));
static struct runstate rs;
static struct time_info ti __attribute__((aligned(64)));
static u8 straddle[8192] __attribute__((aligned(4096)));
static u64 area;

static const u64 outside[] = {
	0x0000800000000000UL,   /* non-canonical */
	0x8000000000000000UL,   /* non-canonical */
	HYPERVISOR_VIRT_START,  /* the hypervisor's range */
	HYPERVISOR_VIRT_END - 8,
};

static long vop(u64 cmd, u64 vcpu, u64 arg) { return HC3(HC_vcpu_op, cmd, vcpu, arg); }

static int same_time(const volatile struct time_info *a, const volatile struct time_info *b)
{
	return a->version == b->version && a->tsc_timestamp == b->tsc_timestamp &&
	       a->system_time == b->system_time && a->mul == b->mul && a->shift == b->shift &&
	       a->flags == b->flags;
}

void tg_main(struct start_info *si)
{
	long rc;
	rc = HC3(HC_update_va_mapping, si_page, si->shared_info | PTE_P | PTE_RW | PTE_A | PTE_D, UVMF_INVLPG);
	tg_check(rc == 0, "map shared_info", rc, 0);
	volatile struct time_info *vt = (volatile struct time_info *)(si_page + 32);  /* vcpu_info[0].time */

	/* ids */
	tg_check(vop(VCPUOP_is_up, 0, 0) == 1, "is_up(0)", vop(VCPUOP_is_up, 0, 0), 1);
	static const u64 absent[] = { 1, 2, 4095, 8191, 0xffffffffUL, (1UL << 32) | 1 };
	static const u64 cmds[] = { VCPUOP_is_up, VCPUOP_get_runstate_info, VCPUOP_register_runstate_memory_area,
				    VCPUOP_send_nmi, VCPUOP_get_physid, VCPUOP_register_vcpu_time_memory_area,
				    VCPUOP_set_singleshot_timer, VCPUOP_stop_singleshot_timer, VCPUOP_up, 99 };
	for (unsigned i = 0; i < sizeof(absent) / sizeof(absent[0]); i++)
		for (unsigned c = 0; c < sizeof(cmds) / sizeof(cmds[0]); c++) {
			rc = vop(cmds[c], absent[i], (u64)&rs);
			tg_check(rc == -XEN_ENOENT, "absent vCPU: -ENOENT", rc, -XEN_ENOENT);
		}
	rc = vop(99, 0, 0);
	tg_check(rc == -XEN_ENOSYS, "unknown sub-op: -ENOSYS", rc, -XEN_ENOSYS);
	rc = vop(VCPUOP_is_up, (1UL << 32) | 0, 0);
	tg_check(rc == 1, "is_up((1 << 32) | 0): vCPU 0, the upper half ignored", rc, 1);
	rc = vop((0xabcdUL << 32) | VCPUOP_is_up, 0, 0);
	tg_check(rc == 1, "sub-op with upper bits: an int, the upper half ignored", rc, 1);
	rc = vop((1UL << 32) | VCPUOP_get_runstate_info, 1UL << 32, (u64)&rs);
	tg_check(rc == 0 && rs.state == 0, "get_runstate_info with upper bits in both", rc, 0);

	/* runstate */
	rc = vop(VCPUOP_get_runstate_info, 0, (u64)&rs);
	tg_check(rc == 0 && rs.state == 0, "get_runstate_info: running", rs.state, 0);
	tg_check(rs.time[0] > 0, "get_runstate_info: time running", rs.time[0], 1);
	rc = vop(VCPUOP_get_runstate_info, 0, 0x1000);
	tg_check(rc == -XEN_EFAULT, "get_runstate_info unmapped buffer: -EFAULT", rc, -XEN_EFAULT);
	for (unsigned i = 0; i < sizeof(outside) / sizeof(outside[0]); i++) {
		rc = vop(VCPUOP_get_runstate_info, 0, outside[i]);
		tg_check(rc == -XEN_EFAULT, "get_runstate_info outside buffer: -EFAULT", rc, -XEN_EFAULT);
	}

	static const u64 area_ops[] = { VCPUOP_register_runstate_memory_area, VCPUOP_register_vcpu_time_memory_area };
	for (int k = 0; k < 2; k++) {
		u64 op = area_ops[k];
		rc = vop(op, 0, 0x1000);
		tg_check(rc == -XEN_EFAULT, "area: unreadable argument -EFAULT", rc, -XEN_EFAULT);
		rc = vop(op, 0, 0x8000000000000000UL);
		tg_check(rc == -XEN_EFAULT, "area: non-canonical argument -EFAULT", rc, -XEN_EFAULT);
		for (unsigned i = 0; i < sizeof(outside) / sizeof(outside[0]); i++) {
			area = outside[i];
			rc = vop(op, 0, (u64)&area);
			tg_check(rc == -XEN_EFAULT, "area outside the guest's half: -EFAULT", rc, -XEN_EFAULT);
		}
		area = 0x00007ffffffff000UL;
		rc = vop(op, 0, (u64)&area);
		tg_check(rc == 0, "area at an unmapped lower-half address: 0", rc, 0);
		area = 0;
		rc = vop(op, 0, (u64)&area);
		tg_check(rc == 0, "area 0 (unregister): 0", rc, 0);
	}

	rs.state = 7;
	area = (u64)&rs;
	rc = vop(VCPUOP_register_runstate_memory_area, 0, (u64)&area);
	tg_check(rc == 0 && rs.state == 0, "runstate area filled: running", rs.state, 0);
	area = 0;
	vop(VCPUOP_register_runstate_memory_area, 0, (u64)&area);

	/* the time area: vcpu_info's record */
	area = (u64)&ti;
	rc = vop(VCPUOP_register_vcpu_time_memory_area, 0, (u64)&area);
	tg_check(rc == 0, "register_vcpu_time_memory_area", rc, 0);
	tg_check((ti.version & 1) == 0 && ti.version != 0, "time area: even version", ti.version, 2);
	tg_check(same_time(&ti, vt), "time area: vcpu_info's record", ti.system_time, vt->system_time);
	tg_check(ti.mul != 0, "time area: tsc_to_system_mul", ti.mul, 1);
	/* straddling two pages */
	volatile struct time_info *st = (volatile struct time_info *)(straddle + 4096 - 12);
	area = (u64)st;
	rc = vop(VCPUOP_register_vcpu_time_memory_area, 0, (u64)&area);
	tg_check(rc == 0 && same_time(st, vt), "time area across a page boundary", st->mul, vt->mul);
	area = 0;
	rc = vop(VCPUOP_register_vcpu_time_memory_area, 0, (u64)&area);
	tg_check(rc == 0, "time area unregistered", rc, 0);

	/* send_nmi, get_physid */
	rc = vop(VCPUOP_send_nmi, 0, (u64)&rs);
	tg_check(rc == -XEN_EINVAL, "send_nmi with an argument: -EINVAL", rc, -XEN_EINVAL);
	rc = vop(VCPUOP_get_physid, 0, (u64)&rs);
	tg_check(rc == -XEN_EINVAL, "get_physid in a domU: -EINVAL", rc, -XEN_EINVAL);
	rc = vop(VCPUOP_get_physid, 0, 0x1000);
	tg_check(rc == -XEN_EINVAL, "get_physid, bad pointer: -EINVAL first", rc, -XEN_EINVAL);
}
