// The firmware's steps, as in TensorFlow Lite Micro's examples: set up once, then one loop per image.
#ifndef KERNORM_FIRMWARE_MAIN_FUNCTIONS_H_
#define KERNORM_FIRMWARE_MAIN_FUNCTIONS_H_

// Reads the arguments (IMAGES N), opens the images and allocates the model's tensors.
// Returns false, having printed why, when it cannot.
bool setup(int argc, char* argv[]);

// Classifies the next image and prints "<index> <class>". Returns false when no image is left
// or one fails (then `finish` reports the failure).
bool loop();

// Prints the summary line,
//   summary images=<N> arena_used_bytes=<A> ticks=<T> tick_hz=<F> stack_used_bytes=<S> heap_used_bytes=<H>
// (ticks: the clock's ticks spent in Invoke over all images, at tick_hz per second), and returns the exit
// status: 0 when every image was classified.
int finish();

#endif  // KERNORM_FIRMWARE_MAIN_FUNCTIONS_H_
