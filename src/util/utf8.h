/* utf8.h - strict UTF-8 and the escaped form of untrusted bytes in messages.
 *
 * Strings from files and requests (GGUF metadata, tensor names, tool names)
 * may hold any bytes. Messages and dumps show them as they are where they are
 * valid UTF-8 and printable, and as \xNN escapes otherwise, so that a message
 * never carries raw invalid bytes or control characters to a terminal or a
 * JSON log. Thread-safe: no state.
 */
#ifndef DS4_UTIL_UTF8_H
#define DS4_UTIL_UTF8_H

#include <stddef.h>

/* The length (1-4) of the valid UTF-8 character at p[0..n), or 0 when the
 * bytes there are not one: a stray continuation byte, an overlong form, a
 * surrogate (U+D800..U+DFFF), a code point past U+10FFFF, or a sequence cut
 * short by n. NUL is a valid character (length 1). */
int ds4_utf8_char(const unsigned char *p, size_t n);

/* Whether s[0..n) is text a GGUF string may hold as written: valid UTF-8
 * (ds4_utf8_char) with no C0 control character or DEL. */
int ds4_utf8_text(const char *s, size_t n);

/* s[0..n) escaped into buf (cap bytes, always NUL-terminated): printable
 * ASCII and valid multi-byte UTF-8 as they are, a backslash as \\, every
 * other byte (controls, DEL, invalid UTF-8) as \xNN; at most max source
 * bytes, then "..." (max 0: all that fit). Returns buf. */
const char *ds4_escaped(char *buf, size_t cap, const char *s, size_t n, size_t max);

#endif
