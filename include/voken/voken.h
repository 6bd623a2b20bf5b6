// Umbrella header for voken's public API.
#pragma once

#include "voken/error.h"
#include "voken/image.h"
#include "voken/image_io.h"
#include "voken/pipeline.h"
#include "voken/version.h"
