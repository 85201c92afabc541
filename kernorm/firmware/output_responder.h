// What the firmware does with a classification: prints it.
#ifndef KERNORM_FIRMWARE_OUTPUT_RESPONDER_H_
#define KERNORM_FIRMWARE_OUTPUT_RESPONDER_H_

// Prints "<index> <class>" on a line of its own.
void RespondToClassification(long index, int digit);

#endif  // KERNORM_FIRMWARE_OUTPUT_RESPONDER_H_
