#include "dgms_rt/json.h"

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace dgms_rt {
namespace {
constexpr int kMaxDepth = 200;
}  // namespace

class JsonParser {
 public:
  JsonParser(const char* data, size_t size) : p_(data), begin_(data),
                                               end_(data + size) {}

  Status run(Json* out) {
    skip_space();
    Status s = value(out, 0);
    if (!s.ok()) return s;
    skip_space();
    if (p_ != end_) return fail("unexpected data after the JSON value");
    return Status::Ok();
  }

 private:
  Status fail(const std::string& what) const {
    return Status(StatusCode::kInvalidArgument,
                  "invalid JSON at byte " + std::to_string(p_ - begin_) +
                      ": " + what);
  }
  void skip_space() {
    while (p_ != end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' ||
                          *p_ == '\r'))
      ++p_;
  }
  bool literal(const char* word) {
    size_t n = std::strlen(word);
    if (size_t(end_ - p_) < n || std::memcmp(p_, word, n) != 0) return false;
    p_ += n;
    return true;
  }

  Status value(Json* out, int depth) {
    if (depth > kMaxDepth) return fail("nesting deeper than 200 levels");
    if (p_ == end_) return fail("unexpected end of input");
    char c = *p_;
    if (c == '{') return object(out, depth);
    if (c == '[') return array(out, depth);
    if (c == '"') {
      out->type_ = Json::Type::kString;
      return string(&out->string_);
    }
    if (c == 't' && literal("true")) {
      out->type_ = Json::Type::kBool;
      out->bool_ = true;
      return Status::Ok();
    }
    if (c == 'f' && literal("false")) {
      out->type_ = Json::Type::kBool;
      return Status::Ok();
    }
    if (c == 'n' && literal("null")) return Status::Ok();
    if (c == '-' || (c >= '0' && c <= '9')) return number(out);
    return fail(std::string("unexpected character '") + c + "'");
  }

  Status object(Json* out, int depth) {
    out->type_ = Json::Type::kObject;
    ++p_;
    skip_space();
    if (p_ != end_ && *p_ == '}') {
      ++p_;
      return Status::Ok();
    }
    while (true) {
      skip_space();
      if (p_ == end_ || *p_ != '"') return fail("expected a string key");
      std::string key;
      Status s = string(&key);
      if (!s.ok()) return s;
      skip_space();
      if (p_ == end_ || *p_ != ':') return fail("expected ':'");
      ++p_;
      skip_space();
      Json member;
      s = value(&member, depth + 1);
      if (!s.ok()) return s;
      out->members_.emplace_back(std::move(key), std::move(member));
      skip_space();
      if (p_ == end_) return fail("unexpected end of input in an object");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == '}') {
        ++p_;
        return Status::Ok();
      }
      return fail("expected ',' or '}'");
    }
  }

  Status array(Json* out, int depth) {
    out->type_ = Json::Type::kArray;
    ++p_;
    skip_space();
    if (p_ != end_ && *p_ == ']') {
      ++p_;
      return Status::Ok();
    }
    while (true) {
      skip_space();
      Json item;
      Status s = value(&item, depth + 1);
      if (!s.ok()) return s;
      out->items_.push_back(std::move(item));
      skip_space();
      if (p_ == end_) return fail("unexpected end of input in an array");
      if (*p_ == ',') {
        ++p_;
        continue;
      }
      if (*p_ == ']') {
        ++p_;
        return Status::Ok();
      }
      return fail("expected ',' or ']'");
    }
  }

  static void append_utf8(uint32_t cp, std::string* s) {
    if (cp < 0x80) {
      s->push_back(char(cp));
    } else if (cp < 0x800) {
      s->push_back(char(0xC0 | (cp >> 6)));
      s->push_back(char(0x80 | (cp & 0x3F)));
    } else if (cp < 0x10000) {
      s->push_back(char(0xE0 | (cp >> 12)));
      s->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      s->push_back(char(0x80 | (cp & 0x3F)));
    } else {
      s->push_back(char(0xF0 | (cp >> 18)));
      s->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
      s->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
      s->push_back(char(0x80 | (cp & 0x3F)));
    }
  }

  bool hex4(uint32_t* out) {
    if (end_ - p_ < 4) return false;
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      char c = p_[i];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= uint32_t(c - 'A' + 10);
      else return false;
    }
    p_ += 4;
    *out = v;
    return true;
  }

  // Checks one UTF-8 sequence starting at p_ and appends it.
  Status utf8(std::string* s) {
    const unsigned char c = static_cast<unsigned char>(*p_);
    int extra;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) { extra = 1; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { extra = 2; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { extra = 3; cp = c & 0x07; }
    else return fail("invalid UTF-8");
    if (end_ - p_ <= extra) return fail("invalid UTF-8 at the end of input");
    for (int i = 1; i <= extra; ++i) {
      const unsigned char t = static_cast<unsigned char>(p_[i]);
      if ((t & 0xC0) != 0x80) return fail("invalid UTF-8");
      cp = (cp << 6) | (t & 0x3F);
    }
    if ((extra == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) ||
        (extra == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
      return fail("invalid UTF-8");
    s->append(p_, size_t(extra + 1));
    p_ += extra + 1;
    return Status::Ok();
  }

  Status string(std::string* out) {
    ++p_;  // opening quote
    while (true) {
      if (p_ == end_) return fail("unterminated string");
      const unsigned char c = static_cast<unsigned char>(*p_);
      if (c == '"') {
        ++p_;
        return Status::Ok();
      }
      if (c < 0x20) return fail("control character in a string");
      if (c >= 0x80) {
        Status s = utf8(out);
        if (!s.ok()) return s;
        continue;
      }
      if (c != '\\') {
        out->push_back(char(c));
        ++p_;
        continue;
      }
      ++p_;
      if (p_ == end_) return fail("unterminated escape");
      const char e = *p_++;
      switch (e) {
        case '"': out->push_back('"'); break;
        case '\\': out->push_back('\\'); break;
        case '/': out->push_back('/'); break;
        case 'b': out->push_back('\b'); break;
        case 'f': out->push_back('\f'); break;
        case 'n': out->push_back('\n'); break;
        case 'r': out->push_back('\r'); break;
        case 't': out->push_back('\t'); break;
        case 'u': {
          uint32_t cp;
          if (!hex4(&cp)) return fail("invalid \\u escape");
          if (cp >= 0xD800 && cp <= 0xDBFF && end_ - p_ >= 6 && p_[0] == '\\'
              && p_[1] == 'u') {
            const char* save = p_;
            p_ += 2;
            uint32_t low;
            if (hex4(&low) && low >= 0xDC00 && low <= 0xDFFF) {
              cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
            } else {
              p_ = save;
            }
          }
          // A lone surrogate (Python accepts it) becomes U+FFFD here.
          if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
          append_utf8(cp, out);
          break;
        }
        default:
          return fail(std::string("invalid escape \\") + e);
      }
    }
  }

  Status number(Json* out) {
    const char* start = p_;
    bool integral = true;
    if (*p_ == '-') ++p_;
    if (p_ == end_) return fail("invalid number");
    if (*p_ == '0') {
      ++p_;
    } else if (*p_ >= '1' && *p_ <= '9') {
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    } else {
      return fail("invalid number");
    }
    if (p_ != end_ && *p_ == '.') {
      integral = false;
      ++p_;
      if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9'))
        return fail("invalid number");
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    if (p_ != end_ && (*p_ == 'e' || *p_ == 'E')) {
      integral = false;
      ++p_;
      if (p_ != end_ && (*p_ == '+' || *p_ == '-')) ++p_;
      if (p_ == end_ || !(*p_ >= '0' && *p_ <= '9'))
        return fail("invalid number");
      while (p_ != end_ && *p_ >= '0' && *p_ <= '9') ++p_;
    }
    if (p_ - start > 400) return fail("number too long");
    std::string text(start, p_);
    out->type_ = Json::Type::kNumber;
    errno = 0;
    out->number_ = std::strtod(text.c_str(), nullptr);
    if (integral) {
      errno = 0;
      long long v = std::strtoll(text.c_str(), nullptr, 10);
      if (errno == 0) {
        out->is_int_ = true;
        out->int_ = v;
      }
    }
    return Status::Ok();
  }

  const char* p_;
  const char* begin_;
  const char* end_;
};

Status Json::parse(const char* data, size_t size, Json* out) {
  *out = Json();
  JsonParser parser(data, size);
  return parser.run(out);
}

const Json* Json::find(const std::string& key) const {
  if (type_ != Type::kObject) return nullptr;
  const Json* found = nullptr;
  for (const auto& member : members_)
    if (member.first == key) found = &member.second;
  return found;
}

std::string Json::describe(size_t max_chars) const {
  std::string s;
  switch (type_) {
    case Type::kNull: s = "null"; break;
    case Type::kBool: s = bool_ ? "true" : "false"; break;
    case Type::kNumber:
      s = is_int_ ? std::to_string(int_) : std::to_string(number_);
      break;
    case Type::kString: s = "\"" + string_ + "\""; break;
    case Type::kArray: {
      s = "[";
      for (size_t i = 0; i < items_.size() && s.size() < max_chars; ++i)
        s += (i ? ", " : "") + items_[i].describe(max_chars);
      s += "]";
      break;
    }
    case Type::kObject: s = "{...}"; break;
  }
  if (s.size() > max_chars) s = s.substr(0, max_chars) + "...";
  return s;
}

}  // namespace dgms_rt
