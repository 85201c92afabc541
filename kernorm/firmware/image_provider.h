// Test images from an IDX file (MNIST's format: a 16-byte header, then 28x28 uint8 pixels per image).
#ifndef KERNORM_FIRMWARE_IMAGE_PROVIDER_H_
#define KERNORM_FIRMWARE_IMAGE_PROVIDER_H_

#include <cstdint>

// Opens `path` and checks that it holds at least `count` images of kImageBytes pixels.
// Returns false, having printed why, when it does not.
bool OpenImages(const char* path, long count);

// Reads image `index` (images are read in order) into `pixels`, kImageBytes of them.
bool ReadImage(long index, uint8_t* pixels);

#endif  // KERNORM_FIRMWARE_IMAGE_PROVIDER_H_
