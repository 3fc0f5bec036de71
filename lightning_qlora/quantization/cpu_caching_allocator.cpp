// A caching CPU allocator for torch: activation-size blocks are reused instead of mapped and faulted in anew.
//
// Why: a training step on a CPU allocates gigabytes in blocks of 128 KiB to a few MiB (activations, their
// gradients, dropout masks), mostly the same sizes every layer and every step. glibc either keeps freed
// blocks in its heap, which fragments and grows by a gigabyte during the first step, or (with a fixed mmap
// threshold) maps each block afresh, so every page is faulted in and zeroed again: measured on a 0.5B
// Llama at two threads, a quarter of the step. This allocator keeps up to `cap` bytes of freed blocks,
// least recently freed evicted first, and hands them back by size class; everything else is returned to
// the operating system at once. Requests below `min_bytes` go to the allocator that was installed before.
//
// A guest: installed with c10::SetCPUAllocator for the duration of a fit (or a load), then the allocator
// that was there before is put back. Tensors keep the deleter of the allocator that made them, so blocks
// handed out here are still freed here after the restore (this library is never unloaded and its
// bookkeeping never freed): they are unmapped then, not cached. Storages made during the stay still name
// this allocator when they grow; once uninstalled it forwards every request to the previous one.
// raw_allocate/raw_deallocate (ideep's engine memory, an opaque mkldnn tensor) look the allocator up at
// each call, so a block raw-allocated here may be raw-freed after the restore by the previous allocator,
// torch's default, whose deleter is glibc's free(). Each block is therefore mapped with one page in front
// holding the header glibc writes for a chunk it mapped itself (what posix_memalign(4096, n) returns for a
// large n): free() of such a pointer unmaps the whole mapping, as for glibc's own. Built and loaded by
// cpu_caching_allocator.py.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr std::size_t kPage = 4096;
constexpr int kClassesPerDoubling = 8;  // a block serves requests up to 1/8 smaller than its size
constexpr std::size_t kLargest = std::size_t{1} << 48;  // larger requests are not the cache's

struct FreeBlock {
  void* ptr;
  std::size_t size;
};
using FreeList = std::list<FreeBlock>;  // newest first

struct Cache {
  std::mutex mutex;
  std::unordered_map<void*, std::size_t> live;  // block -> mapped size
  FreeList free_blocks;
  std::unordered_map<std::size_t, std::vector<FreeList::iterator>> free_by_size;  // oldest first
  std::size_t min_bytes = 0;
  std::size_t cap_bytes = 0;
  std::size_t cached_bytes = 0;
  std::size_t live_bytes = 0;
  std::uint64_t hits = 0;
  std::uint64_t misses = 0;
  std::uint64_t evictions = 0;
  std::atomic<c10::Allocator*> previous{nullptr};  // the allocator installed before this one
  std::atomic<bool> active{false};  // installed: serve and cache; else forward and unmap
};

Cache* cache = nullptr;  // never freed: tensors may outlive every other object

// Round up to a size class: pages, then 8 classes between consecutive powers of two. `n` is at most
// kLargest, so nothing here overflows.
std::size_t size_class(std::size_t n) {
  std::size_t size = (n + kPage - 1) & ~(kPage - 1);
  std::size_t top = std::size_t{1} << (63 - __builtin_clzll(size));  // highest power of two <= size
  std::size_t step = top / kClassesPerDoubling;
  if (step < kPage) step = kPage;
  return (size + step - 1) / step * step;
}

// The page in front of every block: glibc's header of an mmapped chunk ends right before the block.
constexpr std::size_t kFront = kPage;
constexpr std::size_t kIsMmapped = 2;  // glibc's IS_MMAPPED bit in a chunk's size field

void* map(std::size_t size) {
  void* base = mmap(nullptr, size + kFront, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (base == MAP_FAILED) return nullptr;
  char* block = static_cast<char*>(base) + kFront;
  std::size_t* header = reinterpret_cast<std::size_t*>(block) - 2;  // glibc's prev_size and size fields
  header[0] = kFront - 2 * sizeof(std::size_t);  // from the mapping's start to the chunk
  header[1] = (size + 2 * sizeof(std::size_t)) | kIsMmapped;  // the chunk: header and block
  return block;
}

void unmap(void* ptr, std::size_t size) { munmap(static_cast<char*>(ptr) - kFront, size + kFront); }

// Blocks evicted under the lock are unmapped after it is released: munmap interrupts every core running
// this process's threads, and the other threads need not wait for that.
struct Evicted {
  static constexpr int kMax = 32;
  FreeBlock blocks[kMax];
  int count = 0;
  ~Evicted() {
    for (int i = 0; i < count; ++i) unmap(blocks[i].ptr, blocks[i].size);
  }
};

void evict_oldest_locked(Evicted* later) {
  FreeBlock oldest = cache->free_blocks.back();
  auto bucket = cache->free_by_size.find(oldest.size);
  bucket->second.erase(bucket->second.begin());
  if (bucket->second.empty()) cache->free_by_size.erase(bucket);
  cache->free_blocks.pop_back();
  cache->cached_bytes -= oldest.size;
  cache->evictions++;
  if (later != nullptr && later->count < Evicted::kMax) {
    later->blocks[later->count++] = oldest;
  } else {
    unmap(oldest.ptr, oldest.size);
  }
}

// torch.profiler(profile_memory=True) sees these blocks as it sees the default allocator's.
void report_to_profiler(void* ptr, std::int64_t delta, std::size_t live, std::size_t reserved) {
  if (c10::memoryProfilingEnabled()) {
    c10::reportMemoryUsageToProfiler(ptr, delta, live, reserved, c10::Device(c10::DeviceType::CPU));
  }
}

void release(void* ptr) {
  Evicted evicted;  // declared before the lock, so unmapped after it is released
  std::unique_lock<std::mutex> lock(cache->mutex);
  auto found = cache->live.find(ptr);
  if (found == cache->live.end()) {  // a small block handed back through raw_deallocate
    lock.unlock();
    cache->previous.load()->raw_deleter()(ptr);
    return;
  }
  std::size_t size = found->second;
  cache->live.erase(found);
  cache->live_bytes -= size;
  std::size_t live = cache->live_bytes;
  // A larger block would flush the whole cache; after the restore nothing would reuse a cached one.
  bool keep = 2 * size <= cache->cap_bytes && cache->active.load();
  if (keep) {
    while (cache->cached_bytes + size > cache->cap_bytes) evict_oldest_locked(&evicted);
    try {  // a deleter must not throw: if bookkeeping cannot grow, the block goes back to the OS
      cache->free_blocks.push_front(FreeBlock{ptr, size});
      try {
        cache->free_by_size[size].push_back(cache->free_blocks.begin());
      } catch (...) {
        cache->free_blocks.pop_front();
        throw;
      }
      cache->cached_bytes += size;
    } catch (...) {
      keep = false;
    }
  }
  std::size_t reserved = live + cache->cached_bytes;
  lock.unlock();
  if (!keep) unmap(ptr, size);
  report_to_profiler(ptr, -static_cast<std::int64_t>(size), live, reserved);
}

void* take_cached_locked(std::size_t size) {
  auto bucket = cache->free_by_size.find(size);
  if (bucket == cache->free_by_size.end()) return nullptr;
  FreeList::iterator newest = bucket->second.back();
  bucket->second.pop_back();
  if (bucket->second.empty()) cache->free_by_size.erase(bucket);
  void* ptr = newest->ptr;
  cache->free_blocks.erase(newest);
  cache->cached_bytes -= size;
  return ptr;
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t n) override {
    // Small requests, and sizes no machine has, go to the allocator installed before (torch's message).
    c10::Allocator* previous = cache->previous.load();
    if (!cache->active.load() || n < cache->min_bytes || n > kLargest) return previous->allocate(n);
    std::size_t size = size_class(n);
    void* ptr = nullptr;
    std::size_t live = 0;
    std::size_t reserved = 0;
    {
      std::unique_lock<std::mutex> lock(cache->mutex);
      ptr = take_cached_locked(size);
      if (ptr != nullptr) {
        cache->hits++;
      } else {
        cache->misses++;
        lock.unlock();
        ptr = map(size);
        if (ptr == nullptr) {  // the cached blocks may be what is missing; then glibc's own rules
          release_all_cached();
          ptr = map(size);
          if (ptr == nullptr) return previous->allocate(n);  // e.g. at vm.max_map_count
        }
        lock.lock();
      }
      try {
        // An entry for this address can be left from a block that free() unmapped after a restore.
        auto entry = cache->live.try_emplace(ptr, size);
        if (!entry.second) {
          cache->live_bytes -= entry.first->second;
          entry.first->second = size;
        }
      } catch (...) {
        lock.unlock();
        unmap(ptr, size);
        throw;
      }
      cache->live_bytes += size;
      live = cache->live_bytes;
      reserved = live + cache->cached_bytes;
    }
    report_to_profiler(ptr, static_cast<std::int64_t>(size), live, reserved);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // raw_allocate/raw_deallocate (ideep's scratch memory) need one deleter for every block, so `release`
  // hands pointers it did not map to the previous allocator's raw deleter. Small blocks' DataPtrs still
  // carry that allocator's own deleter, so compare_exchange_deleter against ours fails for them (only
  // CUDA code does that).
  c10::DeleterFnPtr raw_deleter() const override {
    return cache->previous.load()->raw_deleter() != nullptr ? &release : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  static void release_all_cached() {
    Evicted evicted;
    std::lock_guard<std::mutex> lock(cache->mutex);
    while (!cache->free_blocks.empty()) evict_oldest_locked(&evicted);
  }
};

CachingCPUAllocator* allocator = nullptr;  // never destroyed: a thread may allocate during exit

// A process forked while another thread holds the lock (a DataLoader worker) must not inherit it held.
void before_fork() { cache->mutex.lock(); }
void after_fork() { cache->mutex.unlock(); }

}  // namespace

extern "C" {

int lq_alloc_abi_version() { return 2; }

// Route CPU allocations of `min_bytes` and more through the cache, keeping up to `cap_bytes` of freed
// blocks (the first call's sizes stay). Returns 1 when torch now allocates through it, 0 when torch kept
// an allocator of higher priority, -1 for invalid sizes, -2 where the C library is not glibc. Priority 0, torch's default, so that
// lq_alloc_uninstall can put the previous allocator back exactly as it was.
int lq_alloc_install(long long min_bytes, long long cap_bytes) {
#ifndef __GLIBC__
  return -2;  // the blocks' headers are glibc's
#endif
  if (cache == nullptr) {
    if (min_bytes < 1 || cap_bytes < 0) return -1;
    cache = new Cache();
    cache->min_bytes = static_cast<std::size_t>(min_bytes);
    cache->cap_bytes = static_cast<std::size_t>(cap_bytes);
    allocator = new CachingCPUAllocator();
    pthread_atfork(before_fork, after_fork, after_fork);
  }
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != allocator) {
    cache->previous.store(current);  // before torch can route a request here
    c10::SetCPUAllocator(allocator, /*priority=*/0);
  }
  bool now = c10::GetCPUAllocator() == allocator;
  cache->active.store(now);
  return now ? 1 : 0;
}

// Put back the allocator that was installed before (if this one is still the current one), unmap the
// cached blocks and forward every later request to the previous allocator. Returns 1 if it was put back,
// 0 if another allocator had replaced this one meanwhile (that one stays).
int lq_alloc_uninstall() {
  if (cache == nullptr) return 0;
  int restored = 0;
  if (c10::GetCPUAllocator() == allocator) {
    c10::SetCPUAllocator(cache->previous.load(), /*priority=*/0);
    restored = 1;
  }
  cache->active.store(false);
  CachingCPUAllocator::release_all_cached();
  return restored;
}

// Whether torch's CPU allocator is this one right now.
int lq_alloc_current() { return allocator != nullptr && c10::GetCPUAllocator() == allocator ? 1 : 0; }

// Return every cached block to the operating system (what malloc_trim is to glibc's heap).
void lq_alloc_release_cached() {
  if (cache != nullptr) CachingCPUAllocator::release_all_cached();
}

// cached bytes, live bytes, hits, misses, evictions, min bytes, cap bytes.
void lq_alloc_stats(long long* out) {
  if (cache == nullptr) return;
  std::lock_guard<std::mutex> lock(cache->mutex);
  out[0] = static_cast<long long>(cache->cached_bytes);
  out[1] = static_cast<long long>(cache->live_bytes);
  out[2] = static_cast<long long>(cache->hits);
  out[3] = static_cast<long long>(cache->misses);
  out[4] = static_cast<long long>(cache->evictions);
  out[5] = static_cast<long long>(cache->min_bytes);
  out[6] = static_cast<long long>(cache->cap_bytes);
}

}  // extern "C"
