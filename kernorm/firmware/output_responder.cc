#include "output_responder.h"

#include "print.h"

void RespondToClassification(long index, int digit) { PrintLine({Number(index), " ", Number(digit)}); }
