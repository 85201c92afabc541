#include "image_provider.h"

#include "model_settings.h"
#include "platform.h"
#include "print.h"

namespace {

// IDX stores its header's integers big-endian.
unsigned long BigEndian(const uint8_t* bytes) {
  return (static_cast<unsigned long>(bytes[0]) << 24) | (bytes[1] << 16) | (bytes[2] << 8) | bytes[3];
}

}  // namespace

bool OpenImages(const char* path, long count) {
  uint8_t header[16];
  if (!OpenFile(path) || !ReadFile(header, sizeof(header))) {
    PrintLine({"error: cannot read ", path});
    return false;
  }
  // 0x00000803: unsigned bytes, three dimensions (images, rows, columns).
  if (BigEndian(header) != 0x803 || BigEndian(header + 8) * BigEndian(header + 12) != kImageBytes ||
      count < 0 || BigEndian(header + 4) < static_cast<unsigned long>(count)) {
    PrintLine({"error: ", path, " does not hold ", Number(count), " IDX images of ", Number(kImageBytes), " pixels"});
    return false;
  }
  return true;
}

bool ReadImage(long index, uint8_t* pixels) {
  if (!ReadFile(pixels, kImageBytes)) {
    PrintLine({"error: cannot read image ", Number(index)});
    return false;
  }
  return true;
}
