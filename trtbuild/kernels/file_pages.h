// Weights onnxruntime maps from an engine's external data file: where they lie, and how a kernel that
// keeps its own packed copy gives the file's pages back.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>

namespace trtbuild {

// Whether [begin, end) lies in one private mapping of a file (how onnxruntime maps an engine's
// external data): its pages can be dropped and come back from the file when touched again.
inline bool in_private_file_mapping(const void* begin, const void* end) {
  FILE* maps = std::fopen("/proc/self/maps", "r");
  if (!maps) return false;
  char line[4096];
  bool found = false;
  while (!found && std::fgets(line, sizeof line, maps)) {
    unsigned long lo, hi, offset, inode;
    char perms[8], dev[16], path[4000] = "";
    if (std::sscanf(line, "%lx-%lx %7s %lx %15s %lu %3999s", &lo, &hi, perms, &offset, dev, &inode, path) < 6) continue;
    found = lo <= (uintptr_t)begin && (uintptr_t)end <= hi && perms[3] == 'p' && inode != 0 && path[0] == '/';
  }
  std::fclose(maps);
  return found;
}

// Drops this process's pages of [begin, end) (the whole pages inside it) when the range lies in a
// private file mapping: its memory goes back to the system, and a later read would fault the bytes
// back in from the file unchanged. For a weight a kernel has copied into its own form and that no
// other node reads. Anywhere else (onnxruntime's heap) the range stays as it is.
inline void drop_file_pages(const void* begin, const void* end) {
  const uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
  const uintptr_t first = ((uintptr_t)begin + page - 1) / page * page, last = (uintptr_t)end / page * page;
  if (last > first && in_private_file_mapping(begin, end))
    madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

}  // namespace trtbuild
