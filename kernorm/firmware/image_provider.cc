#include "image_provider.h"

#include <cstdio>

#include "model_settings.h"

namespace {

FILE* file = nullptr;

// IDX stores its header's integers big-endian.
unsigned long BigEndian(const uint8_t* bytes) {
  return (static_cast<unsigned long>(bytes[0]) << 24) | (bytes[1] << 16) | (bytes[2] << 8) | bytes[3];
}

}  // namespace

bool OpenImages(const char* path, long count) {
  file = fopen(path, "rb");
  uint8_t header[16];
  if (!file || fread(header, 1, sizeof(header), file) != sizeof(header)) {
    printf("error: cannot read %s\n", path);
    return false;
  }
  // 0x00000803: unsigned bytes, three dimensions (images, rows, columns).
  if (BigEndian(header) != 0x803 || BigEndian(header + 8) * BigEndian(header + 12) != kImageBytes ||
      count < 0 || BigEndian(header + 4) < static_cast<unsigned long>(count)) {
    printf("error: %s does not hold %ld IDX images of %d pixels\n", path, count, kImageBytes);
    return false;
  }
  return true;
}

bool ReadImage(long index, uint8_t* pixels) {
  if (fread(pixels, 1, kImageBytes, file) != static_cast<size_t>(kImageBytes)) {
    printf("error: cannot read image %ld\n", index);
    return false;
  }
  return true;
}
