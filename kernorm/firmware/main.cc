// kernorm's firmware: classifies test images with an exported model under TensorFlow Lite Micro.
//
// Usage: <firmware> IMAGES N, IMAGES an IDX file of 28x28 uint8 images (MNIST's format). It prints
// "<index> <class>" for each of the first N images, then one summary line (see main_functions.h).
// On a Cortex-M the arguments and the output go through semihosting.

#include "main_functions.h"

int main(int argc, char* argv[]) {
  if (!setup(argc, argv)) return 1;
  while (loop()) {
  }
  return finish();
}
