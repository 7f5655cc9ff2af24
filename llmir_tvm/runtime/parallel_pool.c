/*
 * The CPU thread pool behind llmir-tvm's compiled kernels.
 *
 * TVM's LLVM code calls `__TVMBackendParallelLaunch` for every parallel loop; tvm_ffi points
 * that slot of each library it loads at the function registered under the name (the last
 * registration wins). llmir_tvm.runtime.parallel_pool registers `llmir_pool_launch` and
 * `llmir_pool_barrier` below in its place.
 *
 * Why not TVM's pool: its threads wait by spinning on sched_yield(), the workers between jobs
 * and the launching thread at every join. A yield hands the core to any runnable process, a
 * `nice 19` background job included, for that job's whole time slice, at each of the hundreds
 * of parallel kernels of a decode step: beside one such job our engine kept half of its idle
 * speed. Here a waiting thread spins on `pause` (it keeps its core, and a low-priority job gets
 * the small share the scheduler gives it) for a bounded time, then sleeps on a condition
 * variable, so a waiting thread never gives its core away while work is imminent and never
 * burns a core for long while none is. The spin must outlast a low-priority job's time slice
 * (a few ms): a thread that sleeps while the job holds the other core wakes late, or on the core
 * of the thread it waits for, and the two then take turns on one core.
 *
 * Semantics follow TVMBackendParallelLaunch: num_task == 0 means one task per pool thread; the
 * calling thread runs task 0; a task returning nonzero makes the launch return -1 with that
 * task's error raised on the caller (through tvm_ffi's error API, whose functions the loader
 * passes in: this file includes tvm_ffi's C header for its types, and links nothing of TVM).
 * A launch from inside a task runs its tasks serially on that thread. Launches from different
 * threads take turns.
 *
 * Weight prefetch (the packed function llmir_pool_register_prefetch registers): between two
 * parallel products of a batch-1 decode step the calling thread runs the small serial kernels
 * (norms, rotary, the cache append, attention) while the memory bus idles and the workers spin.
 * A compiled model posts the next product's weight tensor before those kernels; each worker then
 * reads the front of the share of that weight it will read in the product (the products' tasks
 * split a weight into one contiguous range per thread), at most `prefetch_bytes`, into its own
 * cache, and stops at the next launch. It reads with plain loads: software prefetch instructions
 * were dropped once the core's miss buffers filled (a 3.5 MB product after a 40 us gap: 5%
 * faster with prefetcht0, 15% with loads; Zen 4). Since loads fault where prefetches do not,
 * the pool holds a reference to the posted tensor until the next launch or post, and a post
 * waits for the workers to leave the old one (they check between chunks of 2 KiB).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include <sched.h>
#include <string.h>

#include <tvm/ffi/c_api.h>

typedef struct {
  void* sync_handle;
  int32_t num_task;
} ParallelGroupEnv;

typedef int (*ParallelLambda)(int task_id, ParallelGroupEnv* penv, void* cdata);
typedef void (*ErrorMoveFromRaised)(void** result);
typedef void (*ErrorSetRaised)(void* error);
typedef int (*ObjectDecRef)(void* obj);
typedef int (*ObjectIncRef)(void* obj);
typedef void (*ErrorSetRaisedFromCStr)(const char* kind, const char* message);
typedef int (*FunctionCreate)(void* self, TVMFFISafeCallType safe_call, void (*deleter)(void*),
                              TVMFFIObjectHandle* out);
typedef int (*FunctionSetGlobal)(const TVMFFIByteArray* name, TVMFFIObjectHandle f, int allow_override);

enum { kMaxThreads = 256, kCacheLine = 64, kSyncStride = kCacheLine / sizeof(atomic_int) };

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A wait: spin on `pause` until `done(arg)` or `spin_ns` pass; returns whether done. */
static int spin_until(int (*done)(void*), void* arg, int64_t spin_ns) {
  if (done(arg)) return 1;
  int64_t deadline = now_ns() + spin_ns;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      cpu_relax();
      if (done(arg)) return 1;
    }
    if (now_ns() >= deadline) return done(arg);
  }
}

static struct {
  /* The job: written by the launcher before it publishes `ticket`, read by its participants. */
  ParallelLambda flambda;
  void* cdata;
  ParallelGroupEnv env;
  int num_task;
  atomic_int sync_counter[kMaxThreads * kSyncStride];
  void* _Atomic error; /* the first failing task's error (a tvm_ffi Error handle) */

  /* (job number << 16) | participating threads; a worker reads only this to know its part. */
  _Alignas(kCacheLine) atomic_uint_fast64_t ticket;
  _Alignas(kCacheLine) atomic_int pending; /* participating workers still running */
  _Alignas(kCacheLine) atomic_int sleeping_workers;
  atomic_int launcher_sleeping;

  pthread_mutex_t launch_lock; /* one launch at a time */
  pthread_mutex_t sleep_lock;
  pthread_cond_t work_cv, done_cv;

  atomic_int threads;  /* pool width: tasks of a num_task == 0 launch (set by the loader) */
  int started_workers; /* worker threads running (ids 1..started_workers) */
  atomic_int_fast64_t spin_ns; /* how long a waiting thread spins before it sleeps */
  uint64_t launches;   /* parallel launches run on the pool */
  atomic_uint_fast64_t worker_sleeps, launcher_sleeps; /* waits that outlasted the spin */

  /* The weight to prefetch. `prefetch_seq` is odd while the launching thread replaces it; a
   * worker counts itself in `prefetch_readers` before it looks, and the replacing thread waits
   * for none to remain before it drops the old tensor's reference (`prefetch_tensor`). */
  _Alignas(kCacheLine) atomic_uint_fast64_t prefetch_seq;
  atomic_int prefetch_readers;
  const char* _Atomic prefetch_base;
  atomic_int_fast64_t prefetch_total;
  void* prefetch_tensor; /* the posted tensor object (one reference), under launch_lock */
  atomic_int_fast64_t prefetch_bytes; /* most bytes a worker reads per post (0: off) */
  uint64_t prefetch_posts;

  ErrorMoveFromRaised move_from_raised;
  ErrorSetRaised set_raised;
  ObjectDecRef dec_ref;
  ObjectIncRef inc_ref;
  ErrorSetRaisedFromCStr raise_message;
} pool = {
    .launch_lock = PTHREAD_MUTEX_INITIALIZER,
    .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
    .work_cv = PTHREAD_COND_INITIALIZER,
    .done_cv = PTHREAD_COND_INITIALIZER,
    .threads = 1, /* serial until the loader configures the width and the spin */
};

static int64_t spin_time(void) { return atomic_load_explicit(&pool.spin_ns, memory_order_relaxed); }

static _Thread_local int inside_task; /* set on workers and on a launcher running its task */

static void keep_error(void) {
  void* err = NULL;
  if (pool.move_from_raised) pool.move_from_raised(&err);
  void* expected = NULL;
  if (err && !atomic_compare_exchange_strong(&pool.error, &expected, err) && pool.dec_ref) {
    pool.dec_ref(err);
  }
  if (!err) { /* a task failed without raising: remember the failure all the same */
    atomic_compare_exchange_strong(&pool.error, &expected, (void*)&pool);
  }
}

/* Run the tasks of thread `tid` among `stride` threads (more tasks than threads: striding). */
static void run_tasks(int tid, int stride) {
  for (int task = tid; task < pool.num_task; task += stride) {
    if (pool.flambda(task, &pool.env, pool.cdata) != 0) keep_error();
  }
}

typedef struct {
  uint64_t seen;
  uint64_t seen_prefetch;
} WorkerWait;

static int ticket_moved(void* arg) {
  return atomic_load_explicit(&pool.ticket, memory_order_acquire) != ((WorkerWait*)arg)->seen;
}

static int work_or_prefetch(void* arg) {
  WorkerWait* w = (WorkerWait*)arg;
  return ticket_moved(arg) || atomic_load_explicit(&pool.prefetch_seq, memory_order_acquire) != w->seen_prefetch;
}

enum { kPrefetchChunk = 2048 }; /* bytes read between two looks at the ticket */

static int prefetch_current(uint64_t seq) {
  return atomic_load_explicit(&pool.prefetch_seq, memory_order_relaxed) == seq;
}

/* Worker `tid`: read the front of its share of the posted weight until the next launch or post.
 * Its share is the weight's tid-th of `threads` contiguous ranges (the products' tasks split it
 * so; a range off by a task only costs a few lines read early for the other thread). */
static void run_prefetch(int tid, WorkerWait* wait) {
  atomic_fetch_add(&pool.prefetch_readers, 1); /* before the look: see replace_prefetch */
  uint64_t seq = atomic_load(&pool.prefetch_seq);
  wait->seen_prefetch = seq;
  const char* base = atomic_load_explicit(&pool.prefetch_base, memory_order_relaxed);
  int64_t total = atomic_load_explicit(&pool.prefetch_total, memory_order_relaxed);
  int threads = atomic_load_explicit(&pool.threads, memory_order_relaxed);
  int64_t limit = atomic_load_explicit(&pool.prefetch_bytes, memory_order_relaxed);
  if (!(seq & 1) && base != NULL && tid < threads && limit > 0) {
    int64_t begin = (total / threads * tid) & ~(int64_t)(kCacheLine - 1);
    int64_t end = total / threads * (tid + 1);
    if (end - begin > limit) end = begin + limit;
    for (int64_t at = begin; at < end && !ticket_moved(wait) && prefetch_current(seq); at += kPrefetchChunk) {
      int64_t stop = at + kPrefetchChunk < end ? at + kPrefetchChunk : end;
      for (int64_t line = at; line < stop; line += kCacheLine) (void)*(const volatile char*)(base + line);
    }
  }
  atomic_fetch_sub(&pool.prefetch_readers, 1);
}

/* Replace the posted weight (NULL: none) and drop the old one's reference; the caller holds
 * launch_lock. Odd `prefetch_seq` turns workers away from the old weight, and once no worker
 * is counted in it (each leaves within a chunk), none can read it again. */
static void replace_prefetch(void* tensor, const char* base, int64_t total) {
  uint64_t seq = atomic_load_explicit(&pool.prefetch_seq, memory_order_relaxed);
  atomic_store(&pool.prefetch_seq, seq + 1);
  while (atomic_load(&pool.prefetch_readers) != 0) cpu_relax();
  void* old = pool.prefetch_tensor;
  pool.prefetch_tensor = tensor;
  atomic_store_explicit(&pool.prefetch_base, base, memory_order_relaxed);
  atomic_store_explicit(&pool.prefetch_total, total, memory_order_relaxed);
  atomic_store(&pool.prefetch_seq, seq + 2);
  if (old && pool.dec_ref) pool.dec_ref(old);
}

typedef struct {
  int tid;
  uint64_t ticket; /* the last job published before this worker started */
} WorkerStart;

static void* worker_main(void* arg) {
  WorkerStart start = *(WorkerStart*)arg;
  free(arg);
  int tid = start.tid;
  inside_task = 1;
  WorkerWait wait = {start.ticket, atomic_load(&pool.prefetch_seq)};
  for (;;) {
    if (!spin_until(work_or_prefetch, &wait, spin_time())) {
      atomic_fetch_add_explicit(&pool.worker_sleeps, 1, memory_order_relaxed);
      pthread_mutex_lock(&pool.sleep_lock);
      atomic_fetch_add(&pool.sleeping_workers, 1);
      while (!ticket_moved(&wait)) pthread_cond_wait(&pool.work_cv, &pool.sleep_lock);
      atomic_fetch_sub(&pool.sleeping_workers, 1);
      pthread_mutex_unlock(&pool.sleep_lock);
    }
    if (!ticket_moved(&wait)) { /* a prefetch was posted: the ticket has not moved */
      run_prefetch(tid, &wait);
      continue;
    }
    wait.seen = atomic_load_explicit(&pool.ticket, memory_order_acquire);
    wait.seen_prefetch = atomic_load_explicit(&pool.prefetch_seq, memory_order_acquire); /* a launch supersedes it */
    int participants = (int)(wait.seen & 0xffff);
    if (tid >= participants) continue; /* not part of this job: its fields are not ours to read */
    run_tasks(tid, participants);
    if (atomic_fetch_sub(&pool.pending, 1) == 1 && atomic_load(&pool.launcher_sleeping)) {
      pthread_mutex_lock(&pool.sleep_lock);
      pthread_cond_signal(&pool.done_cv);
      pthread_mutex_unlock(&pool.sleep_lock);
    }
  }
  return NULL;
}

static int jobs_done(void* arg) {
  (void)arg;
  return atomic_load_explicit(&pool.pending, memory_order_acquire) == 0;
}

/* Start workers up to id `threads - 1`; returns how many threads the pool can use. */
static int start_workers(int threads) {
  while (pool.started_workers + 1 < threads) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    WorkerStart* start = malloc(sizeof(WorkerStart));
    if (!start) break;
    int id = pool.started_workers + 1;
    start->tid = id;
    start->ticket = atomic_load(&pool.ticket);
    int failed = pthread_create(&thread, &attr, worker_main, start);
    pthread_attr_destroy(&attr);
    if (failed) {
      free(start);
      break;
    }
    pool.started_workers = id;
  }
  return pool.started_workers + 1 < threads ? pool.started_workers + 1 : threads;
}

static int finish(void) {
  void* err = atomic_exchange(&pool.error, NULL);
  if (!err) return 0;
  if (err != (void*)&pool && pool.set_raised) {
    pool.set_raised(err);
    if (pool.dec_ref) pool.dec_ref(err);
  }
  return -1;
}

static int run_serially(ParallelLambda flambda, void* cdata, int num_task) {
  atomic_int counters[kSyncStride] = {0};
  ParallelGroupEnv env = {counters, 1};
  int status = 0;
  for (int task = 0; task < (num_task > 0 ? num_task : 1); ++task) {
    env.num_task = num_task > 0 ? num_task : 1;
    if (flambda(task, &env, cdata) != 0) status = -1;
  }
  return status;
}

int llmir_pool_launch(ParallelLambda flambda, void* cdata, int num_task) {
  if (inside_task || atomic_load_explicit(&pool.threads, memory_order_relaxed) <= 1) return run_serially(flambda, cdata, num_task);
  pthread_mutex_lock(&pool.launch_lock);
  ++pool.launches;
  int threads = start_workers(atomic_load(&pool.threads));
  if (num_task <= 0) num_task = threads;
  int participants = num_task < threads ? num_task : threads;
  pool.flambda = flambda;
  pool.cdata = cdata;
  pool.num_task = num_task;
  pool.env.num_task = num_task;
  int counted = num_task < kMaxThreads ? num_task : kMaxThreads;
  for (int i = 0; i < counted; ++i) {
    atomic_store_explicit(&pool.sync_counter[i * kSyncStride], 0, memory_order_relaxed);
  }
  pool.env.sync_handle = pool.sync_counter;
  atomic_store(&pool.pending, participants - 1);
  uint64_t job = (atomic_load(&pool.ticket) >> 16) + 1;
  atomic_store(&pool.ticket, (job << 16) | (uint64_t)participants);
  if (participants > 1 && atomic_load(&pool.sleeping_workers) > 0) {
    pthread_mutex_lock(&pool.sleep_lock);
    pthread_cond_broadcast(&pool.work_cv);
    pthread_mutex_unlock(&pool.sleep_lock);
  }
  inside_task = 1;
  run_tasks(0, participants);
  inside_task = 0;
  if (!spin_until(jobs_done, NULL, spin_time())) {
    atomic_fetch_add_explicit(&pool.launcher_sleeps, 1, memory_order_relaxed);
    pthread_mutex_lock(&pool.sleep_lock);
    atomic_store(&pool.launcher_sleeping, 1);
    while (!jobs_done(NULL)) pthread_cond_wait(&pool.done_cv, &pool.sleep_lock);
    atomic_store(&pool.launcher_sleeping, 0);
    pthread_mutex_unlock(&pool.sleep_lock);
  }
  int status = finish();
  if (pool.prefetch_tensor) replace_prefetch(NULL, NULL, 0); /* this launch was what it prepared */
  pthread_mutex_unlock(&pool.launch_lock);
  return status;
}

typedef struct {
  atomic_int* counter;
  int old;
} BarrierWait;

static int counter_passed(void* arg) {
  BarrierWait* w = (BarrierWait*)arg;
  return atomic_load_explicit(w->counter, memory_order_relaxed) > w->old;
}

/* All tasks of a launch meet here (TVMBackendParallelBarrier); needs num_task <= threads. */
int llmir_pool_barrier(int task_id, ParallelGroupEnv* penv) {
  atomic_int* counters = (atomic_int*)penv->sync_handle;
  int old = atomic_fetch_add_explicit(&counters[task_id * kSyncStride], 1, memory_order_release);
  for (int i = 0; i < penv->num_task; ++i) {
    if (i == task_id) continue;
    BarrierWait wait = {&counters[i * kSyncStride], old};
    while (!spin_until(counter_passed, &wait, spin_time())) sched_yield();
  }
  atomic_thread_fence(memory_order_acquire);
  return 0;
}

/* The packed function `(tensor) -> None` posting a tensor for the workers to read (see the file
 * comment). A hint: a no-op on one thread, from inside a task, with the prefetch off, while
 * another thread launches, or for a tensor not in host memory. */
static int prefetch_safe_call(void* self, const TVMFFIAny* args, int32_t num_args, TVMFFIAny* result) {
  (void)self;
  result->type_index = kTVMFFINone;
  result->v_int64 = 0;
  if (num_args != 1 || args[0].type_index != kTVMFFITensor) {
    if (pool.raise_message) pool.raise_message("TypeError", "the weight prefetch takes exactly one tensor");
    return -1;
  }
  void* object = args[0].v_obj;
  const DLTensor* tensor = (const DLTensor*)((const char*)object + sizeof(TVMFFIObject));
  if (inside_task || tensor->device.device_type != kDLCPU || !pool.inc_ref ||
      atomic_load_explicit(&pool.prefetch_bytes, memory_order_relaxed) <= 0 ||
      atomic_load_explicit(&pool.threads, memory_order_relaxed) <= 1 ||
      pthread_mutex_trylock(&pool.launch_lock) != 0) {
    return 0;
  }
  if (pool.started_workers == 0) { /* no launch yet: nobody to read it */
    pthread_mutex_unlock(&pool.launch_lock);
    return 0;
  }
  int64_t elements = 1;
  for (int i = 0; i < tensor->ndim; ++i) elements *= tensor->shape[i];
  pool.inc_ref(object);
  replace_prefetch(object, (const char*)tensor->data + tensor->byte_offset,
                   elements * ((tensor->dtype.bits * tensor->dtype.lanes + 7) / 8));
  ++pool.prefetch_posts;
  pthread_mutex_unlock(&pool.launch_lock);
  return 0;
}

/* Register the prefetch under `name` with tvm_ffi (its functions passed in by the loader). */
int llmir_pool_register_prefetch(const char* name, FunctionCreate create, FunctionSetGlobal set_global) {
  TVMFFIObjectHandle function = NULL;
  if (create(NULL, prefetch_safe_call, NULL, &function) != 0) return -1;
  TVMFFIByteArray bytes = {name, strlen(name)};
  int status = set_global(&bytes, function, 1);
  if (pool.dec_ref) pool.dec_ref(function); /* the global table holds its own reference */
  return status;
}

/* Most bytes a worker reads per post (0 turns the prefetch off). */
int llmir_pool_set_prefetch_bytes(int64_t bytes) {
  if (bytes < 0) return -1;
  atomic_store(&pool.prefetch_bytes, bytes);
  return 0;
}

/* Set the pool's width (threads, caller included) and how long a waiting thread spins. */
int llmir_pool_configure(int threads, int64_t spin_ns) {
  if (threads < 1 || threads > kMaxThreads || spin_ns < 0) return -1;
  pthread_mutex_lock(&pool.launch_lock);
  atomic_store(&pool.threads, threads);
  atomic_store(&pool.spin_ns, spin_ns);
  pthread_mutex_unlock(&pool.launch_lock);
  return 0;
}

int llmir_pool_threads(void) { return atomic_load(&pool.threads); }

/* Counters since the process started: launches, worker sleeps, launcher sleeps, prefetch posts. */
void llmir_pool_stats(uint64_t out[4]) {
  pthread_mutex_lock(&pool.launch_lock);
  out[0] = pool.launches;
  out[3] = pool.prefetch_posts;
  pthread_mutex_unlock(&pool.launch_lock);
  out[1] = atomic_load(&pool.worker_sleeps);
  out[2] = atomic_load(&pool.launcher_sleeps);
}

/* The tvm_ffi functions: a failing task's error is moved with them (see the file comment), the
 * posted weight referenced, a bad argument raised. */
void llmir_pool_set_ffi_api(ErrorMoveFromRaised move_from_raised, ErrorSetRaised set_raised,
                              ObjectDecRef dec_ref, ObjectIncRef inc_ref, ErrorSetRaisedFromCStr raise_message) {
  pool.move_from_raised = move_from_raised;
  pool.set_raised = set_raised;
  pool.dec_ref = dec_ref;
  pool.inc_ref = inc_ref;
  pool.raise_message = raise_message;
}

/* fork(): the child has none of the workers; it starts its own at its first launch. */
static void before_fork(void) { pthread_mutex_lock(&pool.launch_lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.launch_lock); }
static void after_fork_child(void) {
  pool.started_workers = 0;
  atomic_store(&pool.sleeping_workers, 0);
  atomic_store(&pool.launcher_sleeping, 0);
  atomic_store(&pool.prefetch_readers, 0); /* a worker of the parent may have been reading */
  pthread_mutex_init(&pool.sleep_lock, NULL);
  pthread_cond_init(&pool.work_cv, NULL);
  pthread_cond_init(&pool.done_cv, NULL);
  pthread_mutex_unlock(&pool.launch_lock);
}

__attribute__((constructor)) static void register_fork_handlers(void) {
  pthread_atfork(before_fork, after_fork_parent, after_fork_child);
}
