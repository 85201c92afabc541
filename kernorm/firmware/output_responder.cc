#include "output_responder.h"

#include <cstdio>

void RespondToClassification(long index, int digit) { printf("%ld %d\n", index, digit); }
