// A small cache of large output buffers for the fused CPU kernels.
//
// Why: an (E, D) fp32 output is tens to hundreds of MB. glibc serves such sizes with a fresh mmap
// and returns them with munmap, so every call pays a page fault plus the kernel zeroing each 4 KiB
// page on first touch (measured ~0.35 s for 512 MB on one core: as much as the GEMMs themselves at
// E = 1e6, and ~20 ms per 64K-edge head chunk). Outputs of these ops are handed out with a deleter
// that gives the buffer back here; the next call of the same size reuses the already-mapped pages.
//
// Bounded: at most kMaxBuffers buffers and NINO_FAST_CPU_POOL_MB MiB (default: 2 GiB or 1/8 of the
// RAM, the smaller; 0 disables) are kept; buffers under 1 MiB go through the ordinary allocator. A
// request takes the smallest cached buffer that fits (sizes rounded to 64 KiB). Nothing stays
// cached between NiNo steps: the Python step calls torch.ops.nino_fast._cpu_pool_release() after
// each pass and when it ends (release()), so within a step only buffers of the current pass are
// kept. Between calls of the nn layers (a training loop) the buffers a step freed -- its outputs
// and input gradients -- stay for the next step, which asks for the same sizes: at E = 1e6, D = 128
// that was 12-20% of a layer's training step (two 512 MB buffers paged in per step). They are freed
// by nino_fast.release_cpu_buffers().
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif
#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

namespace nino_fast::cpu {

class OutPool {
 public:
  static OutPool& get() {
    static OutPool* pool =
        new OutPool();  // never destroyed: tensors may outlive static destruction
    return *pool;
  }

  size_t cap() const { return cap_; }
  // bytes held in cached (free) buffers
  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return cached_;
  }

  // Frees every cached buffer (buffers still in use come back later and are cached again).
  void release() {
    std::vector<std::pair<size_t, void*>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (auto& b : drop) std::free(b.second);
  }

  // A buffer of at least `nbytes` (its true size in `*got`): the smallest cached one that fits,
  // else a new one. Fitting rather than exact sizes lets a chunked loop's last, shorter chunk (and
  // the next tile's smaller output) reuse a buffer instead of caching one more: the pool then holds
  // about the largest set of buffers in use at once, not one buffer per distinct size.
  void* take(size_t nbytes, size_t* got) {
    *got = nbytes;
    {
      std::lock_guard<std::mutex> lock(mu_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i)
        if (free_[i].first >= nbytes &&
            (best == free_.size() || free_[i].first < free_[best].first))
          best = i;
      if (best < free_.size()) {
        void* p = free_[best].second;
        *got = free_[best].first;
        free_.erase(free_.begin() + int64_t(best));
        cached_ -= *got;
        return p;
      }
    }
    // 2 MiB-aligned and marked for transparent huge pages (where the kernel offers them on request,
    // THP "madvise" mode): first touch then faults once per 2 MiB instead of once per 4 KiB page.
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, nbytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    madvise(p, nbytes, MADV_HUGEPAGE);  // a hint: failure only means 4 KiB pages
#endif
    return p;
  }

  void give(void* p, size_t nbytes) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (nbytes > cap_) {
        drop.push_back(p);
      } else {
        // evict the oldest until the new one fits
        while (!free_.empty() && (cached_ + nbytes > cap_ || free_.size() >= kMaxBuffers)) {
          drop.push_back(free_.front().second);
          cached_ -= free_.front().first;
          free_.erase(free_.begin());
        }
        free_.emplace_back(nbytes, p);
        cached_ += nbytes;
      }
    }
    for (void* q : drop) std::free(q);
  }

 private:
  static constexpr size_t kMaxBuffers = 8;
  static constexpr size_t kHuge = size_t(2) << 20;

  OutPool() {
    size_t mb = 2048;
#if defined(__linux__)
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    if (pages > 0 && page > 0) mb = std::min(mb, (size_t(pages) * size_t(page) >> 20) / 8);
#endif
    if (const char* s = std::getenv("NINO_FAST_CPU_POOL_MB"))
      mb = size_t(std::strtoull(s, nullptr, 10));
    cap_ = mb << 20;
  }

  std::mutex mu_;
  std::vector<std::pair<size_t, void*>> free_;
  size_t cached_ = 0, cap_ = 0;
};

// An uninitialised float32 CPU tensor of `sizes`, from the pool when it is large enough to matter.
inline at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = size_t(numel) * sizeof(float);
  auto& pool = OutPool::get();
  if (nbytes < (size_t(1) << 20) || pool.cap() == 0) return at::empty(sizes, options);
  size_t got = 0;
  void* p = pool.take((nbytes + 65535) / 65536 * 65536, &got);
  if (p == nullptr) return at::empty(sizes, options);
  return at::from_blob(p, sizes, [got](void* q) { OutPool::get().give(q, got); },
                       options.dtype(at::kFloat).device(at::kCPU));
}

}  // namespace nino_fast::cpu
