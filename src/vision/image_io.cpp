// The public image-file helpers (include/voken/image_io.h) over the vision layer's codecs.
#include "voken/image_io.h"

#include "vision/image.h"

namespace voken {

Image load_image(const std::string& path) { return vision::load_image(path); }

std::string encode_png(const Image& image) { return vision::encode_image(image, vision::ImageFormat::Png); }

void save_image(const Image& image, const std::string& path) { vision::save_image(image, path); }

}  // namespace voken
