/* The mesh rasteriser of raster.py, compiled: one view of a triangle mesh into a shaded, box-filtered image.
 *
 * It repeats the numpy path's arithmetic operation for operation, in the same order and in double
 * precision (built as ISO C11, so the compiler fuses no multiply-add), so a pixel centre is inside a
 * triangle, and one surface is nearer than another, exactly when the numpy path says so:
 *   - pixel (r, c) of the supersampled image has its centre at (c + 0.5, r + 0.5); x grows to the right,
 *     y downwards; a camera-frame vertex (X, Y, Z) lands at (n/2 + X·scale, n/2 − Y·scale);
 *   - a triangle whose doubled pixel area is at most 1e-12, or whose bounding box holds no pixel centre,
 *     is skipped;
 *   - the barycentric weights of its 2nd and 3rd vertices and its depth are planes u·x + v·y + w over
 *     pixel coordinates; a centre is inside when both weights are ≥ 0 and their sum ≤ 1 (either winding);
 *   - the nearest surface (largest depth towards the camera) wins; among equal depths the later triangle;
 *   - flat two-sided shading: grey = rint(lo + (ambient + (1 − ambient)·|n·l|)·(hi − lo)) clipped to
 *     [lo, hi], with n the triangle's unit normal and l the unit light, both in the camera frame;
 *   - the output pixel is the mean of its ss × ss samples (background 0), rounded half to even.
 *
 * No Python headers: built at first use by the system's compiler and called through ctypes.
 */
#include <math.h>
#include <stdint.h>

/* One side of a triangle as a bound on the x of pixel centres in row y: the constraint a·x + v·y + w ≥ 0
 * (a barycentric weight ≥ 0, or their sum ≤ 1) holds at most a pixel beyond x = alpha + beta·y, on the
 * side `lower` (x ≥ bound) or not (x ≤ bound). The exact test in the pixel loop still decides every centre;
 * bounds only skip columns that cannot pass it, with a pixel to spare. A side is used only where rounding
 * cannot move its bound by a millionth of a pixel (terms of the constraint, at most `mag`, are under 1e9
 * times its slope a); a nearly horizontal side is not, and its rows keep the whole bounding box. */
typedef struct {
    double alpha, beta;
    int lower, used;
} side_bound;

static side_bound make_bound(double a, double v, double w, double mag) {
    side_bound b = {0.0, 0.0, 0, 0};
    if (fabs(a) * 1e9 > mag) {
        b.alpha = -w / a;
        b.beta = -v / a;
        b.lower = a > 0.0;
        b.used = 1;
    }
    return b;
}

static inline void narrow(const side_bound *b, double y, double *lo, double *hi) {
    if (!b->used)
        return;
    const double bound = b->alpha + b->beta * y;
    if (b->lower)
        *lo = fmax(*lo, bound - 1.0);
    else
        *hi = fmin(*hi, bound + 1.0);
}

/* Render one view.
 *   cam     [n_verts, 3] vertices in the camera frame (right, up, towards the camera)
 *   faces   [n_faces, 3] vertex indices
 *   size    output side in pixels; ss samples per pixel along each axis; n = size · ss
 *   scale   pixels per unit of the camera frame at the supersampled size
 *   light   the unit light direction in the camera frame
 *   zbuf    [n · n] scratch; grey [n · n] scratch
 *   out     [size, size, 3] uint8, zero on entry: the pixels of the vertices' bounding box are written
 * Returns 0, or 1 if a face index lies outside 0..n_verts-1 (nothing meaningful is written then).
 */
int raster_view(const double *cam, int64_t n_verts, const int64_t *faces, int64_t n_faces, int64_t size,
                int64_t ss, double scale, const double *light, double ambient, double lo, double hi,
                double *restrict zbuf, uint8_t *restrict grey, uint8_t *restrict out) {
    const int64_t n = size * ss;
    const double half = (double)n / 2.0;
    /* Every triangle lies in the vertices' bounding box: only the whole output pixels over it are cleared,
     * drawn and filtered (rows and columns [b0, b1) of the supersampled image, multiples of ss). */
    double vx0 = INFINITY, vx1 = -INFINITY, vy0 = INFINITY, vy1 = -INFINITY;
    for (int64_t i = 0; i < n_verts; i++) {
        const double x = half + cam[3 * i] * scale, y = half - cam[3 * i + 1] * scale;
        vx0 = fmin(vx0, x);
        vx1 = fmax(vx1, x);
        vy0 = fmin(vy0, y);
        vy1 = fmax(vy1, y);
    }
    const int64_t bc0 = (int64_t)fmin(fmax(floor(vx0 - 1.0), 0.0), (double)n) / ss * ss;
    const int64_t bc1 = ((int64_t)fmin(fmax(ceil(vx1 + 1.0), 0.0), (double)n) + ss - 1) / ss * ss;
    const int64_t br0 = (int64_t)fmin(fmax(floor(vy0 - 1.0), 0.0), (double)n) / ss * ss;
    const int64_t br1 = ((int64_t)fmin(fmax(ceil(vy1 + 1.0), 0.0), (double)n) + ss - 1) / ss * ss;
    for (int64_t r = br0; r < br1; r++) {
        for (int64_t c = bc0; c < bc1; c++) {
            zbuf[r * n + c] = -INFINITY;
            grey[r * n + c] = 0;
        }
    }
    for (int64_t t = 0; t < n_faces; t++) {
        const int64_t *f = faces + 3 * t;
        if (f[0] < 0 || f[0] >= n_verts || f[1] < 0 || f[1] >= n_verts || f[2] < 0 || f[2] >= n_verts)
            return 1;
        const double *p0 = cam + 3 * f[0], *p1 = cam + 3 * f[1], *p2 = cam + 3 * f[2];
        const double x0 = half + p0[0] * scale, x1 = half + p1[0] * scale, x2 = half + p2[0] * scale;
        const double y0 = half - p0[1] * scale, y1 = half - p1[1] * scale, y2 = half - p2[1] * scale;
        const double area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0);
        if (!(fabs(area) > 1e-12))
            continue;
        const double xmin = fmin(fmin(x0, x1), x2), xmax = fmax(fmax(x0, x1), x2);
        const double ymin = fmin(fmin(y0, y1), y2), ymax = fmax(fmax(y0, y1), y2);
        /* Pixel centres in the box: c0 = ceil(xmin − 0.5) .. c1 = floor(xmax − 0.5), clipped to the image
         * in double before the conversion, so that no coordinate overflows an integer. */
        const int64_t c0 = (int64_t)fmin(fmax(ceil(xmin - 0.5), 0.0), (double)n);
        const int64_t c1 = (int64_t)fmin(fmax(floor(xmax - 0.5), -1.0), (double)(n - 1));
        const int64_t r0 = (int64_t)fmin(fmax(ceil(ymin - 0.5), 0.0), (double)n);
        const int64_t r1 = (int64_t)fmin(fmax(floor(ymax - 0.5), -1.0), (double)(n - 1));
        if (c1 < c0 || r1 < r0)
            continue;

        /* Flat two-sided shading from the camera-frame normal. */
        const double e1x = p1[0] - p0[0], e1y = p1[1] - p0[1], e1z = p1[2] - p0[2];
        const double e2x = p2[0] - p0[0], e2y = p2[1] - p0[1], e2z = p2[2] - p0[2];
        double nx = e1y * e2z - e1z * e2y, ny = e1z * e2x - e1x * e2z, nz = e1x * e2y - e1y * e2x;
        const double norm = fmax(sqrt(nx * nx + ny * ny + nz * nz), 1e-30);
        nx /= norm;
        ny /= norm;
        nz /= norm;
        const double lam = fabs(nx * light[0] + ny * light[1] + nz * light[2]);
        const double shade = ambient + (1.0 - ambient) * lam;
        const uint8_t g = (uint8_t)fmin(fmax(rint(lo + shade * (hi - lo)), lo), hi);

        /* The planes, as raster.py computes them. */
        const double ax = x0, ay = y0;
        const double bx = x1 - ax, by = y1 - ay, cx = x2 - ax, cy = y2 - ay;
        const double inv = 1.0 / area;
        const double wb_u = cy * inv, wb_v = -cx * inv;
        const double wc_u = -by * inv, wc_v = bx * inv;
        const double dz_b = p1[2] - p0[2], dz_c = p2[2] - p0[2];
        const double z_u = dz_b * wb_u + dz_c * wc_u, z_v = dz_b * wb_v + dz_c * wc_v;
        const double wb_w = -(wb_u * ax + wb_v * ay);
        const double wc_w = -(wc_u * ax + wc_v * ay);
        const double z_w = p0[2] - z_u * ax - z_v * ay;

        const double span = (double)n; /* |x|, |y| ≤ n at every pixel centre tested */
        const side_bound sides[3] = {
            make_bound(wb_u, wb_v, wb_w, (fabs(wb_u) + fabs(wb_v)) * span + fabs(wb_w)),
            make_bound(wc_u, wc_v, wc_w, (fabs(wc_u) + fabs(wc_v)) * span + fabs(wc_w)),
            make_bound(-(wb_u + wc_u), -(wb_v + wc_v), 1.0 - (wb_w + wc_w),
                       (fabs(wb_u) + fabs(wc_u) + fabs(wb_v) + fabs(wc_v)) * span + fabs(wb_w) + fabs(wc_w) + 1.0),
        };
        for (int64_t r = r0; r <= r1; r++) {
            const double y = (double)r + 0.5;
            const double wb_y = wb_v * y, wc_y = wc_v * y, z_y = z_v * y;
            double lo = (double)c0, hi = (double)c1 + 1.0; /* pixel centres c + 0.5 for c in c0..c1 */
            for (int k = 0; k < 3; k++)
                narrow(&sides[k], y, &lo, &hi);
            const int64_t cs = (int64_t)fmax(ceil(lo - 0.5), (double)c0);
            const int64_t ce = (int64_t)fmin(floor(hi - 0.5), (double)c1);
            double *zrow = zbuf + r * n;
            uint8_t *grow = grey + r * n;
            /* Stores without branches (each keeps the old value where the test fails), so that the compiler
             * can vectorise the row. */
            for (int64_t c = cs; c <= ce; c++) {
                const double x = (double)c + 0.5;
                const double wb = wb_u * x + wb_y + wb_w;
                const double wc = wc_u * x + wc_y + wc_w;
                const double z = z_u * x + z_y + z_w;
                const int in = (wb >= 0.0) & (wc >= 0.0) & (wb + wc <= 1.0) & (z >= zrow[c]);
                zrow[c] = in ? z : zrow[c];
                grow[c] = in ? g : grow[c];
            }
        }
    }

    /* Box filter: the mean of each pixel's samples. The samples are whole numbers, so their sum is exact
     * whatever the order, and so is the rounding of the mean. */
    const double count = (double)(ss * ss);
    for (int64_t R = br0 / ss; R < br1 / ss; R++) {
        for (int64_t C = bc0 / ss; C < bc1 / ss; C++) {
            int64_t sum = 0;
            for (int64_t i = 0; i < ss; i++) {
                const uint8_t *row = grey + (R * ss + i) * n + C * ss;
                for (int64_t j = 0; j < ss; j++)
                    sum += row[j];
            }
            const uint8_t v = (uint8_t)rint((double)sum / count);
            uint8_t *o = out + 3 * (R * size + C);
            o[0] = o[1] = o[2] = v;
        }
    }
    return 0;
}
