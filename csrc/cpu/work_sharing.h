// Caller-runs work sharing: the thread that calls an op does the work itself, and helpers from a
// persistent pool join in if the OS runs them in time.
//
// at::parallel_for gives each thread a fixed share and waits at a barrier for all of them, so on a
// busy machine one descheduled thread holds the call for a whole time slice (milliseconds against
// a 0.2 ms scan). Here units of work are claimed from an atomic counter, in runs of consecutive
// units that shrink to one as the work runs out. The caller claims units like any helper and then
// waits only for units a helper has already claimed and is running; a helper that wakes after every
// unit is claimed finds nothing and leaves. Each
// participant gets a distinct slot in [0, threads) (the caller slot 0), so results can be kept per
// slot and merged afterwards; callers that merge by a total order (packed keys) get the same
// answer whichever thread ran which unit.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

namespace recjpq_cpu {

// Calls fn(ctx, unit, slot) once for every unit in [0, num_units), on the calling thread and on up
// to threads - 1 pool helpers; slot < threads, and the units one slot runs come in increasing order.
// threads <= 0 means at::get_num_threads(). Returns when every unit has run. fn must not throw.
void run_units(int64_t num_units, int threads, void (*fn)(void* ctx, int64_t unit, int slot), void* ctx);

// As run_units, but the caller never waits for a helper the OS has descheduled: once every unit is
// claimed it gives running helpers a few microseconds, then revokes the slow ones and runs again,
// itself, every unit that no finished slot covers, in increasing order, as slot `threads`. So fn may
// run a unit twice (into different slots), and a revoked helper may still be running fn after this
// returns: fn must touch only what `keep` owns (held until the last helper lets go of it).
// Returns, per slot in [0, threads], whether that slot's results count (each unit is covered by
// exactly one counted slot).
std::vector<char> run_units_revocable(int64_t num_units, int threads, void (*fn)(void* ctx, int64_t unit, int slot),
                                      std::shared_ptr<void> keep);

// The number of participants run_units(threads = 0) would use.
int work_threads();

template <typename Fn>
void run_units(int64_t num_units, int threads, Fn& fn) {
  run_units(num_units, threads, [](void* ctx, int64_t unit, int slot) { (*static_cast<Fn*>(ctx))(unit, slot); },
            &fn);
}

}  // namespace recjpq_cpu
