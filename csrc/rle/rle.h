#pragma once
// SIIM-ACR run-length encoding, CPU and CUDA behind one contract.
//
// Pixels are numbered in column-major order (the flattening of mask.T), 0-based. A mask's runs are
// the maximal intervals [start, end) of foreground pixels in that order.
//   Style::Siim      "start length" pairs; the first start is absolute, each later one counts the
//                    background pixels since the end of the previous run; "-1" is an empty mask.
//   Style::Absolute  1-based absolute start and length pairs, as most other Kaggle segmentation
//                    competitions use; an empty mask is "" in that style.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor_view.h"

namespace pneumoseg::rle {

enum class Style : int { Siim = 0, Absolute = 1 };

// One run of foreground pixels of image `image`, column-major [start, end).
struct Run {
  int64_t image;
  int64_t start;
  int64_t end;
};

// One RLE string to parse: its text, the image it paints into, and its index in the caller's list
// (for error messages; -1 for a single string).
struct RleText {
  const char* data;
  size_t size;
  int64_t image;
  int64_t item;
};

// A batch of encoded strings: mask i's text is the concatenation of pieces[first[i], first[i + 1]).
// Large masks are formatted a strip of columns at a time, so their text comes in several pieces and
// is joined only once, into the Python string: memory stays close to the size of the text.
struct EncodedBatch {
  std::vector<std::string> pieces;
  std::vector<int64_t> first;  // N + 1 entries
};

// Text <-> runs. Parsing validates everything (tokens, pairs, bounds) and throws InputError(Rle)
// naming the string and token at fault. It appends to `runs` and leaves them normalised (see
// normalize_runs), so many overlapping annotations cost memory for their union, not their sum.
void parse_runs(const std::vector<RleText>& texts, int64_t height, int64_t width, Style style,
                std::vector<Run>& runs);

// Sorts runs by (image, start) and merges those of one image that overlap or touch: afterwards the
// runs of an image are disjoint and at most half its pixels in number. Cheap on already-sorted runs.
void normalize_runs(std::vector<Run>& runs);

// Paint normalised runs as 1 into a zeroed uint8 (N, H, W) view. Every run is checked against the
// view before anything is written.
void paint_runs_cpu(const std::vector<Run>& runs, const TensorView& out);

// Encode a (N, H, W) mask batch of any dtype (nonzero = foreground).
void encode_cpu(const TensorView& masks, Style style, EncodedBatch& out);

// The data-parallel algorithm of the CUDA encoder run serially on the CPU: the same unit walks,
// scans and formatting arithmetic, so the CPU tests check the decomposition the GPU relies on.
void encode_units_cpu(const TensorView& masks, Style style, EncodedBatch& out);

#ifdef PNEUMOSEG_WITH_CUDA
void paint_runs_cuda(const std::vector<Run>& runs, const TensorView& out, void* stream);
void encode_cuda(const TensorView& masks, Style style, void* stream, EncodedBatch& out);
#endif

}  // namespace pneumoseg::rle
