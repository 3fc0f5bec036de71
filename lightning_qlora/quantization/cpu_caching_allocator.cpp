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
// Installed with c10::SetCPUAllocator, so every CPU tensor torch allocates from then on comes through
// here; tensors allocated before keep their own deleters. Built and loaded by cpu_caching_allocator.py.

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <pthread.h>
#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr std::size_t kPage = 4096;
constexpr int kClassesPerDoubling = 8;  // a block serves requests up to 1/8 smaller than its size

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
  c10::Allocator* previous = nullptr;
};

Cache* cache = nullptr;  // never freed: tensors may outlive every other object

// Round up to a size class: pages, then 8 classes between consecutive powers of two.
std::size_t size_class(std::size_t n) {
  std::size_t size = (n + kPage - 1) & ~(kPage - 1);
  std::size_t top = kPage;
  while (top * 2 <= size) top *= 2;
  std::size_t step = top / kClassesPerDoubling;
  if (step < kPage) step = kPage;
  return (size + step - 1) / step * step;
}

void evict_oldest_locked() {
  FreeBlock oldest = cache->free_blocks.back();
  auto bucket = cache->free_by_size.find(oldest.size);
  bucket->second.erase(bucket->second.begin());
  if (bucket->second.empty()) cache->free_by_size.erase(bucket);
  cache->free_blocks.pop_back();
  cache->cached_bytes -= oldest.size;
  cache->evictions++;
  munmap(oldest.ptr, oldest.size);
}

void release(void* ptr) {
  std::unique_lock<std::mutex> lock(cache->mutex);
  auto found = cache->live.find(ptr);
  if (found == cache->live.end()) {  // a small block handed back through raw_deallocate
    lock.unlock();
    cache->previous->raw_deleter()(ptr);
    return;
  }
  std::size_t size = found->second;
  cache->live.erase(found);
  cache->live_bytes -= size;
  if (2 * size > cache->cap_bytes) {  // a block this large would flush the whole cache
    munmap(ptr, size);
    return;
  }
  while (cache->cached_bytes + size > cache->cap_bytes) evict_oldest_locked();
  cache->free_blocks.push_front(FreeBlock{ptr, size});
  cache->free_by_size[size].push_back(cache->free_blocks.begin());
  cache->cached_bytes += size;
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

void* map_fresh_locked(std::size_t size) {
  void* ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (ptr == MAP_FAILED) {  // the cached blocks may be what is missing
    while (!cache->free_blocks.empty()) evict_oldest_locked();
    ptr = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  }
  return ptr == MAP_FAILED ? nullptr : ptr;
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::DataPtr allocate(std::size_t n) override {
    if (n < cache->min_bytes) return cache->previous->allocate(n);
    std::size_t size = size_class(n);
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(cache->mutex);
      ptr = take_cached_locked(size);
      if (ptr != nullptr) {
        cache->hits++;
      } else {
        cache->misses++;
        ptr = map_fresh_locked(size);
        TORCH_CHECK(ptr != nullptr, "lightning-qlora CPU caching allocator: not enough memory: you tried to ",
                    "allocate ", n, " bytes.");
      }
      cache->live.emplace(ptr, size);
      cache->live_bytes += size;
    }
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  // Small blocks come from the previous allocator, so raw_deallocate works only if it has a raw deleter.
  c10::DeleterFnPtr raw_deleter() const override {
    return cache->previous->raw_deleter() != nullptr ? &release : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingCPUAllocator allocator;

// A process forked while another thread holds the lock (a DataLoader worker) must not inherit it held.
void before_fork() { cache->mutex.lock(); }
void after_fork() { cache->mutex.unlock(); }

}  // namespace

extern "C" {

int lq_alloc_abi_version() { return 1; }

// Route CPU allocations of `min_bytes` and more through the cache, keeping up to `cap_bytes` of freed
// blocks. Returns 1 when torch now allocates through it; later calls only return that.
int lq_alloc_install(long long min_bytes, long long cap_bytes) {
  if (cache == nullptr) {
    if (min_bytes < 1 || cap_bytes < 0) return 0;
    cache = new Cache();
    cache->min_bytes = static_cast<std::size_t>(min_bytes);
    cache->cap_bytes = static_cast<std::size_t>(cap_bytes);
    cache->previous = c10::GetCPUAllocator();
    pthread_atfork(before_fork, after_fork, after_fork);
    c10::SetCPUAllocator(&allocator, /*priority=*/1);
  }
  return c10::GetCPUAllocator() == &allocator ? 1 : 0;
}

// Return every cached block to the operating system (what malloc_trim is to glibc's heap).
void lq_alloc_release_cached() {
  if (cache == nullptr) return;
  std::lock_guard<std::mutex> lock(cache->mutex);
  while (!cache->free_blocks.empty()) evict_oldest_locked();
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
