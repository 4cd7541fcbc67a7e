// The negative modes of the native kernels, shared by csrc/cpu and csrc/cuda.
// lrc_kernels/_validation.py (NegativeMode) mirrors these values; keep them together.
#pragma once

enum NegativeMode : int {
  kNone = 0,         // no negatives: row statistics only (the in-batch primitives)
  kExplicit = 1,     // negatives [B, K, D]
  kBank = 2,         // neg_index [B, K] into a bank [N, D]
  kTeacherBank = 3,  // neg_index [B, K] into the teacher rows themselves
  kInBatch = 4,      // every other teacher row (K = B - 1): the O(B D) in-batch algorithm (CPU one pass)
};
